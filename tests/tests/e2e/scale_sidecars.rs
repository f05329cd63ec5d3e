//! Issue #5, scenario 8: many sidecars. One `trellis control` and N `trellis sidecar`
//! processes (join tokens, CSR mode), all rotating. Prints how fast the fleet starts, how fast
//! rotations reach every sidecar, and what the control plane costs (CPU, RSS). A scale
//! harness: the full run is `#[ignore]`d and run by hand (see `tests/bench/SCALE.md`); a
//! six-sidecar version runs in the suite so the harness and its checks cannot rot:
//!
//! ```text
//! cargo build --release -p trellis
//! ulimit -n 65536   # or up to `ulimit -Hn`; 3 descriptors per sidecar + 256 are checked
//! TRELLIS_BIN=$PWD/target/release/trellis SCALE_SIDECARS=200 \
//!   cargo test --release -p trellis-tests --test e2e scale_sidecars -- --ignored --nocapture
//! ```
//!
//! Knobs (environment): `SCALE_SIDECARS` (200), `SCALE_ROTATE_SECONDS` (10: `--rotate-every`;
//! the SVID TTL is 6 periods and the sidecars' `--expiry-margin` 1.5), `SCALE_SECONDS` (the
//! measured window after all are ready, default 4 periods), `SCALE_POLL_MS` (500: each
//! sidecar's `/certs` is read this often), `SCALE_LAUNCH_THREADS` (4: parallel token creation
//! and process starts).
//!
//! What "push latency" means here. The control plane keeps one rotation timer per stream
//! (`--rotate-every` minus up to 10% jitter, counted from that stream's last issuance), so
//! there is no fleet-wide instant at which a period begins. Two figures stand in for it:
//! - **issue → install**: the control plane logs `issued SVID … serial="S"` and the sidecar
//!   `installed SVID … serial="S"`, both with microsecond wall-clock timestamps from the same
//!   machine; the difference is that rotation's push latency (after signing, through the SDS
//!   stream, the sidecar's validation, to the swap).
//! - **fleet refresh**: for instants `t = window start + k·period`, how long until every
//!   sidecar has installed an SVID after `t` (first, median and last sidecar): the time a
//!   fleet-wide "rotate now" would take with these timers. It is bounded by one period plus
//!   the push latency.
//!
//! Only correctness is asserted: every sidecar turns ready, none exits, none ever shows a
//! missing, expired or not-ready SVID, each installs a new SVID at least once every two
//! periods, and at the end each is ready, connected and has refused no update.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use trellis_tests::echo::EchoApp;
use trellis_tests::sidecar::{rss_kib, Metrics, Sidecar};
use trellis_tests::{
    e2e, http_get, run_with_timeout, trellis_bin, ControlPlane, ControlPlaneOpts, HttpResponse,
    COMMAND_TIMEOUT,
};

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

struct Params {
    sidecars: usize,
    rotate: Duration,
    window: Duration,
    poll: Duration,
    launch_threads: usize,
}

impl Params {
    fn from_env() -> anyhow::Result<Self> {
        fn var(name: &str) -> anyhow::Result<Option<u64>> {
            match std::env::var(name) {
                Ok(v) => {
                    Ok(Some(v.trim().parse().with_context(|| {
                        format!("{name}={v:?}: want a whole number")
                    })?))
                }
                Err(_) => Ok(None),
            }
        }
        let rotate = Duration::from_secs(var("SCALE_ROTATE_SECONDS")?.unwrap_or(10).max(1));
        let p = Params {
            sidecars: var("SCALE_SIDECARS")?.unwrap_or(200) as usize,
            rotate,
            window: var("SCALE_SECONDS")?.map_or(rotate * 4, Duration::from_secs),
            poll: Duration::from_millis(var("SCALE_POLL_MS")?.unwrap_or(500).max(50)),
            launch_threads: var("SCALE_LAUNCH_THREADS")?.unwrap_or(4).max(1) as usize,
        };
        ensure!(p.sidecars > 0, "SCALE_SIDECARS must be positive");
        ensure!(
            p.window >= p.rotate * 3,
            "SCALE_SECONDS must cover at least 3 rotation periods ({}s)",
            (p.rotate * 3).as_secs()
        );
        Ok(p)
    }

    fn svid_ttl(&self) -> Duration {
        self.rotate * 6
    }

    fn expiry_margin(&self) -> Duration {
        self.rotate * 3 / 2
    }
}

/// `/proc/<pid>`: (VmRSS KiB, utime+stime seconds).
fn proc_stats(pid: u32) -> anyhow::Result<(u64, f64)> {
    let rss = rss_kib(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces: state is the first, utime and stime
    // are fields 14 and 15 of the whole line.
    let after: Vec<&str> = stat
        .rsplit_once(')')
        .context("no `)` in /proc/pid/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(after
            .get(i)
            .context("short /proc/pid/stat")?
            .parse::<f64>()?)
    };
    Ok((rss, (ticks(11)? + ticks(12)?) / CLK_TCK))
}

/// The soft `RLIMIT_NOFILE` of this process (inherited by everything it starts).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `/proc/loadavg`'s first three fields: the machine is shared, so each run says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-26T20:51:26.243249Z` (tracing's text format) as a `SystemTime`.
fn parse_utc(ts: &str) -> Option<SystemTime> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse::<u32>().ok()?
    };
    let secs = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + s;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// `(time, serial)` of a log line that carries `message` and a `serial="…"` field.
fn log_event(line: &str, message: &str) -> Option<(SystemTime, String)> {
    if !line.contains(message) {
        return None;
    }
    let t = parse_utc(line.split_whitespace().next()?)?;
    let serial = line.split_once("serial=\"")?.1.split('"').next()?;
    Some((t, serial.to_string()))
}

/// Seconds from `a` to `b` (negative if `b` is earlier).
fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Nearest-rank percentile of an ascending slice (0 for an empty one).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `GET path` on an admin address (the harness's `http_get` has its own 10 s read limit).
async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect {addr}: timed out"))??;
    http_get(tcp, &addr.to_string(), path).await
}

/// `trellis token create` (the harness's `ControlPlane::create_token` needs `&ControlPlane`,
/// which cannot be shared with the launcher threads).
fn create_token(state_dir: &std::path::Path, spiffe_id: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["token", "create", "--state-dir"])
        .arg(state_dir)
        .args(["--spiffe-id", spiffe_id, "--ttl", "1h"]);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "trellis token create {spiffe_id}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        token.starts_with("trellis-join."),
        "trellis token create printed {token:?}"
    );
    Ok(token)
}

/// What a launcher thread needs to start sidecar `i` (plain data: `ControlPlane` is not `Sync`).
#[derive(Clone)]
struct LaunchCtx {
    trust_domain: String,
    sds: SocketAddr,
    bundle: PathBuf,
    log_dir: PathBuf,
    app: SocketAddr,
    expiry_margin: String,
}

fn spiffe_id(td: &str, i: usize) -> String {
    format!("spiffe://{td}/scale/sidecar-{i:04}")
}

/// Starts sidecar `i` (the same flags as `Sidecar::start_unready`, plus `--expiry-margin`) and
/// waits for its listening line. Called from a plain thread, outside `e2e`'s task-local, so
/// the harness does not collect (and print) the stderr tails of hundreds of sidecars when the
/// test fails; the test prints the tails of the sidecars that misbehaved itself.
fn launch(ctx: &LaunchCtx, i: usize, token: &str) -> anyhow::Result<(Sidecar, SystemTime)> {
    let id = spiffe_id(&ctx.trust_domain, i);
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(["--trust-domain", &ctx.trust_domain])
        .args(["--control-plane", &ctx.sds.to_string()])
        .arg("--control-bundle")
        .arg(&ctx.bundle)
        .args(["--spiffe-id", &id])
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--app", &ctx.app.to_string()])
        .args(["--expiry-margin", &ctx.expiry_margin])
        .env("TRELLIS_JOIN_TOKEN", token);
    let spawned = SystemTime::now();
    let sidecar = Sidecar::launch(&format!("sidecar-{i:04}"), &id, cmd, &ctx.log_dir)?;
    Ok((sidecar, spawned))
}

/// Runs `f(i)` for `i in 0..n` on `threads` threads, sending each result on `tx` as it is done.
fn run_parallel<T, F>(n: usize, threads: usize, tx: &mpsc::UnboundedSender<(usize, T)>, f: F)
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || tx.send((i, f(i))).is_err() {
                    return;
                }
            });
        }
    });
}

/// Polls `/ready` until 200; returns when it was seen.
async fn wait_ready(
    admin: SocketAddr,
    deadline: tokio::time::Instant,
) -> anyhow::Result<SystemTime> {
    loop {
        let last = match admin_get(admin, "/ready").await {
            Ok(r) if r.status == 200 => return Ok(SystemTime::now()),
            Ok(r) => format!("{} {}", r.status, r.text().trim()),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("/ready not 200 in time; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What polling one sidecar's `/certs` during the window saw.
#[derive(Default)]
struct Observed {
    /// The serial at the first poll.
    first_serial: Option<String>,
    /// Each change of serial: when it was seen, and the new serial.
    changes: Vec<(SystemTime, String)>,
    polls: u64,
    errors: u64,
    last_error: Option<String>,
    /// Polls that saw no SVID, an expired one, or one inside the expiry margin.
    lost: u64,
    lost_example: Option<String>,
}

async fn observe(
    admin: SocketAddr,
    every: Duration,
    offset: Duration,
    margin: Duration,
    mut stop: watch::Receiver<bool>,
) -> Observed {
    let mut obs = Observed::default();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return obs,
            _ = tick.tick() => {}
        }
        obs.polls += 1;
        let certs = match admin_get(admin, "/certs").await.and_then(|r| {
            ensure!(r.status == 200, "/certs: {}", r.status);
            Ok(serde_json::from_slice::<serde_json::Value>(&r.body)?)
        }) {
            Ok(v) => v,
            Err(e) => {
                obs.errors += 1;
                obs.last_error = Some(format!("{e:#}"));
                continue;
            }
        };
        let now = SystemTime::now();
        let now_unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let svid = &certs["svid"];
        let serial = svid["serial"].as_str();
        let not_after = svid["not_after"].as_u64();
        let problem = match (serial, not_after) {
            (None, _) | (_, None) => Some(format!("no SVID: {certs}")),
            (_, Some(na)) if na <= now_unix => Some(format!("expired SVID: {svid}")),
            (_, Some(na)) if na <= now_unix + margin.as_secs() => {
                Some(format!("SVID inside the expiry margin: {svid}"))
            }
            _ => None,
        };
        if let Some(p) = problem {
            obs.lost += 1;
            obs.lost_example.get_or_insert(p);
        }
        if let Some(serial) = serial {
            let last = obs
                .changes
                .last()
                .map(|(_, s)| s.as_str())
                .or(obs.first_serial.as_deref());
            match last {
                None => obs.first_serial = Some(serial.to_string()),
                Some(l) if l != serial => obs.changes.push((now, serial.to_string())),
                Some(_) => {}
            }
        }
    }
}

/// One sidecar of the fleet.
struct Member {
    sidecar: Sidecar,
    spawned: SystemTime,
    ready: Option<SystemTime>,
    exited: Option<String>,
}

/// Samples the control plane every 250 ms and keeps the highest RSS.
fn rss_peak_sampler(pid: u32, peak: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            if let Ok(kib) = rss_kib(pid) {
                peak.fetch_max(kib, Ordering::Relaxed);
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale harness: run by hand with --ignored, see tests/bench/SCALE.md"]
async fn many_sidecars_rotating() -> anyhow::Result<()> {
    e2e(async { run(Params::from_env()?).await }).await
}

/// The same harness, small enough for CI on 2 cores (6 sidecars, 4 s rotations, 12 s window):
/// the code that produces the README's scale figures runs, and its correctness checks hold,
/// on every change; the figures themselves come from the hand-run version above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_rotates_without_a_gap() -> anyhow::Result<()> {
    let rotate = Duration::from_secs(4);
    e2e(run(Params {
        sidecars: 6,
        rotate,
        window: rotate * 3,
        poll: Duration::from_millis(500),
        launch_threads: 2,
    }))
    .await
}

async fn run(p: Params) -> anyhow::Result<()> {
    let n = p.sidecars;
    // Per sidecar: our end of its stdout pipe and a poll socket here; its SDS connection in
    // the control plane (which inherits this limit).
    let need = n as u64 * 3 + 256;
    match open_file_limit() {
        Some(limit) if limit < need => bail!(
            "open-file limit {limit} is too low for {n} sidecars (want {need}): raise it with `ulimit -n` first (up to `ulimit -Hn`)"
        ),
        Some(_) => {}
        None => eprintln!("warning: cannot read the open-file limit from /proc/self/limits"),
    }
    println!(
        "scale: {n} sidecars, --rotate-every {}s, --svid-ttl {}s, --expiry-margin {}s, window {}s, /certs poll every {} ms, binary {}; load average {}",
        p.rotate.as_secs(),
        p.svid_ttl().as_secs(),
        p.expiry_margin().as_secs(),
        p.window.as_secs(),
        p.poll.as_millis(),
        trellis_bin().display(),
        loadavg()
    );

    let cp = ControlPlane::start(ControlPlaneOpts {
        rotate_every: Some(format!("{}s", p.rotate.as_secs())),
        svid_ttl: Some(format!("{}s", p.svid_ttl().as_secs())),
        ..Default::default()
    })?;
    let cp_pid = cp.child.id();
    let app = EchoApp::start("scale").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let rss_peak = Arc::new(AtomicU64::new(0));
    rss_peak_sampler(cp_pid, rss_peak.clone(), stop_rx.clone());
    let (rss_idle, cpu_idle) = proc_stats(cp_pid)?;

    // Tokens first: `trellis token create` is a process of its own per sidecar.
    let td = cp.trust_domain.as_str().to_string();
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let (state_dir, td, threads) = (cp.state_dir.clone(), td.clone(), p.launch_threads);
        tokio::task::spawn_blocking(move || {
            run_parallel(n, threads, &tx, |i| {
                create_token(&state_dir, &spiffe_id(&td, i))
            })
        })
        .await?;
    }
    let mut tokens = vec![String::new(); n];
    while let Some((i, token)) = rx.recv().await {
        tokens[i] = token?;
    }
    let token_time = started.elapsed();
    println!("tokens: {n} created in {token_time:.2?}");

    // Launch from plain threads; wait for each sidecar's /ready as soon as it is up.
    let ctx = LaunchCtx {
        trust_domain: td.clone(),
        sds: cp.sds_addr,
        bundle: cp.bundle_pem_path.clone(),
        log_dir: cp.dir.path().to_path_buf(),
        app: app.addr,
        expiry_margin: format!("{}s", p.expiry_margin().as_secs()),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let launcher = {
        let threads = p.launch_threads;
        std::thread::spawn(move || {
            run_parallel(n, threads, &tx, |i| launch(&ctx, i, &tokens[i]));
        })
    };
    let ready_deadline = tokio::time::Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(500) * n as u32;
    let mut members: Vec<Option<Member>> = (0..n).map(|_| None).collect();
    let mut readiness = JoinSet::new();
    let mut launch_errors = Vec::new();
    while let Some((i, launched)) = rx.recv().await {
        match launched {
            Ok((sidecar, spawned)) => {
                let admin = sidecar.addrs.admin;
                readiness.spawn(async move { (i, wait_ready(admin, ready_deadline).await) });
                members[i] = Some(Member {
                    sidecar,
                    spawned,
                    ready: None,
                    exited: None,
                });
            }
            Err(e) => launch_errors.push(format!("sidecar-{i:04}: {e:#}")),
        }
    }
    let _ = launcher.join();
    let launched_in = started.elapsed() - token_time;
    let mut ready_errors = Vec::new();
    while let Some(joined) = readiness.join_next().await {
        let (i, ready) = joined?;
        let m = members[i]
            .as_mut()
            .context("readiness of a sidecar never launched")?;
        match ready {
            Ok(t) => m.ready = Some(t),
            Err(e) => ready_errors.push(format!(
                "sidecar-{i:04}: {e:#}\n{}",
                m.sidecar.child.stderr_tail(15)
            )),
        }
    }
    if !launch_errors.is_empty() || !ready_errors.is_empty() {
        for e in launch_errors.iter().chain(&ready_errors).take(3) {
            eprintln!("{e}");
        }
        bail!(
            "{} of {n} sidecars did not start, {} did not turn ready (first three above)",
            launch_errors.len(),
            ready_errors.len()
        );
    }
    let mut members: Vec<Member> = members.into_iter().map(Option::unwrap).collect();
    let first_spawn = members.iter().map(|m| m.spawned).min().unwrap();
    let all_ready = members.iter().filter_map(|m| m.ready).max().unwrap();
    let spawn_to_ready = sorted(
        members
            .iter()
            .map(|m| secs_between(m.spawned, m.ready.unwrap()))
            .collect(),
    );
    let (rss_ready, cpu_ready) = proc_stats(cp_pid)?;
    let sidecar_rss_ready: u64 = members
        .iter()
        .filter_map(|m| rss_kib(m.sidecar.child.id()).ok())
        .sum();
    let startup = secs_between(first_spawn, all_ready);
    println!(
        "startup: {n} sidecars spawned in {launched_in:.2?} ({} threads); all ready {startup:.2} s after the first spawn; spawn→ready p50 {}, max {}",
        p.launch_threads,
        ms(pct(&spawn_to_ready, 50.0)),
        ms(pct(&spawn_to_ready, 100.0)),
    );
    println!(
        "  control plane: RSS idle {}, all ready {}; CPU {:.2} s during startup ({:.0}% of a core); sidecars' RSS {} total",
        mib(rss_idle),
        mib(rss_ready),
        cpu_ready - cpu_idle,
        100.0 * (cpu_ready - cpu_idle) / startup.max(0.001),
        mib(sidecar_rss_ready),
    );

    // The window: poll every sidecar's /certs, sample the control plane, watch for exits.
    let window_start = SystemTime::now();
    let cpu_window_start = proc_stats(cp_pid)?.1;
    let mut observers = JoinSet::new();
    for (i, m) in members.iter().enumerate() {
        let offset = p.poll.mul_f64(i as f64 / n as f64);
        let admin = m.sidecar.addrs.admin;
        let (every, margin, stop) = (p.poll, p.expiry_margin(), stop_rx.clone());
        observers.spawn(async move { (i, observe(admin, every, offset, margin, stop).await) });
    }
    let window_end_at = Instant::now() + p.window;
    while Instant::now() < window_end_at {
        tokio::time::sleep(Duration::from_secs(1).min(window_end_at - Instant::now())).await;
        for m in members.iter_mut().filter(|m| m.exited.is_none()) {
            if let Some(status) = m.sidecar.child.try_exit() {
                m.exited = Some(status.to_string());
            }
        }
    }
    let window_end = SystemTime::now();
    let (rss_end, cpu_end) = proc_stats(cp_pid)?;
    let _ = stop_tx.send(true);
    let mut observed: Vec<Observed> = (0..n).map(|_| Observed::default()).collect();
    while let Some(joined) = observers.join_next().await {
        let (i, obs) = joined?;
        observed[i] = obs;
    }
    let window = secs_between(window_start, window_end);

    // The end state of every sidecar.
    let mut finals = JoinSet::new();
    for (i, m) in members.iter().enumerate() {
        let admin = m.sidecar.addrs.admin;
        finals.spawn(async move {
            let state = async {
                let ready = admin_get(admin, "/ready").await?.status;
                let metrics = Metrics::parse(&admin_get(admin, "/metrics").await?.text())?;
                Ok::<_, anyhow::Error>((ready, metrics))
            };
            (i, state.await)
        });
    }
    let mut end_state = HashMap::new();
    while let Some(joined) = finals.join_next().await {
        let (i, state) = joined?;
        end_state.insert(i, state);
    }
    let sidecar_rss: Vec<u64> = members
        .iter()
        .filter_map(|m| rss_kib(m.sidecar.child.id()).ok())
        .collect();

    // Latencies from the logs: issued (control plane) → installed (sidecar), by serial.
    let issued: HashMap<String, SystemTime> = cp
        .child
        .stderr()
        .lines()
        .filter_map(|l| log_event(l, " issued SVID "))
        .map(|(t, s)| (s, t))
        .collect();
    // Each sidecar's installs, in log order: (when, serial).
    let installed: Vec<Vec<(SystemTime, String)>> = members
        .iter()
        .map(|m| {
            m.sidecar
                .child
                .stderr()
                .lines()
                .filter_map(|l| log_event(l, " installed SVID "))
                .collect()
        })
        .collect();
    let mut first_push = Vec::new();
    let mut rotation_push = Vec::new();
    let mut unmatched = 0usize;
    for events in &installed {
        for (k, (t, serial)) in events.iter().enumerate() {
            let Some(&at) = issued.get(serial) else {
                unmatched += 1;
                continue;
            };
            let latency = secs_between(at, *t);
            if k == 0 {
                first_push.push(latency);
            } else if *t >= window_start && *t <= window_end {
                rotation_push.push(latency);
            }
        }
    }
    let first_push = sorted(first_push);
    let rotation_push = sorted(rotation_push);

    // Fleet refresh: from t_k = window start + k periods, until every sidecar installed anew.
    let mut refresh = Vec::new();
    let mut k = 0u32;
    loop {
        let t_k = window_start + p.rotate * k;
        if secs_between(t_k, window_end) < (p.rotate * 2).as_secs_f64() {
            break;
        }
        let mut waits = Vec::new();
        let mut missing = 0;
        for events in &installed {
            match events.iter().map(|(t, _)| *t).find(|t| *t > t_k) {
                Some(t) if t <= window_end => waits.push(secs_between(t_k, t)),
                _ => missing += 1,
            }
        }
        refresh.push((k, sorted(waits), missing));
        k += 1;
    }

    // Correctness, per sidecar.
    let limit = (p.rotate * 2 + p.poll * 2).as_secs_f64();
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut rotations_in_window = Vec::new();
    let mut rotations_total = Vec::new();
    let (mut polls, mut poll_errors, mut longest_gap) = (0u64, 0u64, 0f64);
    for (i, (m, obs)) in members.iter().zip(&observed).enumerate() {
        polls += obs.polls;
        poll_errors += obs.errors;
        if let Some(status) = &m.exited {
            failures.push((i, format!("exited during the window: {status}")));
        }
        if obs.lost > 0 {
            failures.push((
                i,
                format!(
                    "{} of {} polls saw no usable SVID, e.g. {}",
                    obs.lost,
                    obs.polls,
                    obs.lost_example.as_deref().unwrap_or("?")
                ),
            ));
        }
        if obs.first_serial.is_none() {
            failures.push((
                i,
                format!(
                    "/certs never answered: {}",
                    obs.last_error.as_deref().unwrap_or("no poll")
                ),
            ));
        }
        let mut times = vec![window_start];
        times.extend(obs.changes.iter().map(|(t, _)| *t));
        times.push(window_end);
        let gap = times
            .windows(2)
            .map(|w| secs_between(w[0], w[1]))
            .fold(0.0, f64::max);
        longest_gap = longest_gap.max(gap);
        if gap > limit {
            failures.push((
                i,
                format!(
                    "went {gap:.1} s without a new SVID (limit two periods plus two polls: {limit:.1} s); changes seen at {:?}",
                    obs.changes
                        .iter()
                        .map(|(t, _)| format!("{:.1}", secs_between(window_start, *t)))
                        .collect::<Vec<_>>()
                ),
            ));
        }
        rotations_in_window.push(obs.changes.len() as f64);
        match end_state.get(&i) {
            Some(Ok((ready, metrics))) => {
                let refused = metrics.sum("trellis_sds_updates_total", &[])
                    - metrics.sum("trellis_sds_updates_total", &[("result", "ok")]);
                rotations_total.push(metrics.sum("trellis_svid_rotations_total", &[]));
                if *ready != 200 {
                    failures.push((i, format!("/ready {ready} at the end")));
                }
                if metrics.sum("trellis_sds_connected", &[]) != 1.0 {
                    failures.push((i, "trellis_sds_connected is not 1 at the end".into()));
                }
                if refused != 0.0 {
                    failures.push((
                        i,
                        format!(
                            "refused {refused} SDS updates:\n{}",
                            metrics.lines_of("trellis_sds_updates_total")
                        ),
                    ));
                }
            }
            Some(Err(e)) => failures.push((i, format!("admin at the end: {e:#}"))),
            None => failures.push((i, "no end state".into())),
        }
    }
    let rotations_in_window = sorted(rotations_in_window);
    let rotations_total = sorted(rotations_total);

    let cpu_window = cpu_end - cpu_window_start;
    let cpu_pct = 100.0 * cpu_window / window.max(0.001);
    let rss_peak = rss_peak.load(Ordering::Relaxed).max(rss_end);
    let sidecar_total: u64 = sidecar_rss.iter().sum();
    let sidecar_avg = sidecar_total / (sidecar_rss.len().max(1) as u64);
    let sidecar_max = sidecar_rss.iter().copied().max().unwrap_or(0);
    println!(
        "rotation window: {window:.1} s = {:.1} periods; load average at the end {}",
        window / p.rotate.as_secs_f64(),
        loadavg()
    );
    println!(
        "  new SVIDs per sidecar in the window (polled /certs): min {} max {}; trellis_svid_rotations_total at the end: min {} max {}",
        pct(&rotations_in_window, 0.0),
        pct(&rotations_in_window, 100.0),
        pct(&rotations_total, 0.0),
        pct(&rotations_total, 100.0),
    );
    println!(
        "  longest time any sidecar went without a new SVID: {longest_gap:.2} s (period {} s)",
        p.rotate.as_secs()
    );
    println!(
        "  push latency issued→installed: rotations n={} p50 {} p99 {} max {}; first SVIDs n={} p50 {} max {}; unmatched serials {unmatched}",
        rotation_push.len(),
        ms(pct(&rotation_push, 50.0)),
        ms(pct(&rotation_push, 99.0)),
        ms(pct(&rotation_push, 100.0)),
        first_push.len(),
        ms(pct(&first_push, 50.0)),
        ms(pct(&first_push, 100.0)),
    );
    for (k, waits, missing) in &refresh {
        println!(
            "  fleet refresh from window start + {k} periods: every sidecar had a new SVID after first {:.2} s, p50 {:.2} s, last {:.2} s{}",
            pct(waits, 0.0),
            pct(waits, 50.0),
            pct(waits, 100.0),
            if *missing > 0 {
                format!(" ({missing} sidecars had none before the window ended)")
            } else {
                String::new()
            }
        );
    }
    println!(
        "  control plane: CPU {cpu_window:.2} s in {window:.1} s = {cpu_pct:.1}% of a core; RSS idle {} / all ready {} / peak {} / end {}",
        mib(rss_idle),
        mib(rss_ready),
        mib(rss_peak),
        mib(rss_end)
    );
    println!(
        "  sidecars: RSS {} total, {} avg, {} max; admin polls {polls}, failed {poll_errors}",
        mib(sidecar_total),
        mib(sidecar_avg),
        mib(sidecar_max)
    );
    let (refresh_p50, refresh_max) = refresh
        .iter()
        .map(|(_, w, _)| (pct(w, 50.0), pct(w, 100.0)))
        .fold((0f64, 0f64), |(a, b), (x, y)| (a.max(x), b.max(y)));
    println!(
        "table row: | {n} | {startup:.1} s | {refresh_p50:.1} s / {refresh_max:.1} s | {} / {} | {cpu_pct:.1}% | {} / {} / {} | {} |",
        ms(pct(&rotation_push, 50.0)),
        ms(pct(&rotation_push, 100.0)),
        mib(rss_idle),
        mib(rss_peak),
        mib(rss_end),
        mib(sidecar_avg),
    );

    // A fleet-wide bundle push: `trellis ca rotate` (activating much later) adds a CA to the
    // bundle; time until every sidecar's /certs lists it.
    let mut rotate = Command::new(trellis_bin());
    rotate
        .args([
            "ca",
            "rotate",
            "--activate-after",
            "1h",
            "--trust-domain",
            &td,
        ])
        .arg("--state-dir")
        .arg(&cp.state_dir);
    let rotated = Instant::now();
    let out = trellis_tests::run_with_timeout(rotate, trellis_tests::COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "trellis ca rotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut pushed: Vec<Option<f64>> = vec![None; n];
    let push_deadline = Instant::now() + Duration::from_secs(60);
    while pushed.iter().any(Option::is_none) && Instant::now() < push_deadline {
        let mut polls = JoinSet::new();
        for (i, m) in members
            .iter()
            .enumerate()
            .filter(|(i, _)| pushed[*i].is_none())
        {
            let admin = m.sidecar.addrs.admin;
            polls.spawn(async move {
                let cas = match admin_get(admin, "/certs").await {
                    Ok(r) => serde_json::from_str::<serde_json::Value>(&r.text())
                        .ok()
                        .and_then(|v| v["bundle"].as_array().map(Vec::len))
                        .unwrap_or(0),
                    Err(_) => 0,
                };
                (i, cas)
            });
        }
        while let Some(joined) = polls.join_next().await {
            let (i, cas) = joined?;
            if cas >= 2 {
                pushed[i] = Some(rotated.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing = pushed.iter().filter(|p| p.is_none()).count();
    let pushed = sorted(pushed.into_iter().flatten().collect());
    println!(
        "bundle push: `trellis ca rotate` → new CA in every sidecar's bundle: first {}, p50 {}, last {} ({} of {n}; includes the control plane's 1 s schedule poll and this harness's polling)",
        ms(pct(&pushed, 0.0)),
        ms(pct(&pushed, 50.0)),
        ms(pct(&pushed, 100.0)),
        pushed.len(),
    );
    if missing > 0 {
        failures.push((
            0,
            format!("{missing} sidecars never received the rotated bundle"),
        ));
    }

    if !failures.is_empty() {
        let broken: std::collections::BTreeSet<usize> = failures.iter().map(|(i, _)| *i).collect();
        for (i, why) in failures.iter().take(10) {
            eprintln!("sidecar-{i:04}: {why}");
        }
        for i in broken.iter().take(3) {
            eprintln!(
                "----- sidecar-{i:04} stderr, last 20 lines -----\n{}",
                members[*i].sidecar.child.stderr_tail(20)
            );
        }
        bail!(
            "{} of {n} sidecars misbehaved ({} problems; first ten above)",
            broken.len(),
            failures.len()
        );
    }
    drop(members);
    Ok(())
}

#[test]
fn parses_log_timestamps_and_serials() {
    let t = parse_utc("2026-11-26T20:51:26.243249Z").unwrap();
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    // date -u -d 2026-11-26T20:51:26Z +%s
    assert_eq!(d.as_secs(), 1_795_726_286);
    assert_eq!(d.subsec_micros(), 243_249);
    assert_eq!(
        parse_utc("1970-01-01T00:00:00Z").unwrap(),
        UNIX_EPOCH,
        "whole seconds"
    );
    assert_eq!(
        parse_utc("2000-03-01T00:00:00Z")
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        951_868_800
    );
    assert!(parse_utc("2026-11-26 20:51:26Z").is_none());
    let line = "2026-11-26T20:51:26.243696Z  INFO trellis_sidecar::svid_store: installed SVID spiffe_id=spiffe://example.org/scale/1 serial=\"4a911bcc\"";
    let (t, serial) = log_event(line, " installed SVID ").unwrap();
    assert_eq!(serial, "4a911bcc");
    assert_eq!(
        t.duration_since(UNIX_EPOCH).unwrap().subsec_micros(),
        243_696
    );
    assert!(log_event(line, " issued SVID ").is_none());
}
