//! Reload under load, with real processes: while four app connections send requests through
//! app → sidecar A → sidecar B → app B without pause, sidecar B's policy is rewritten 21
//! times (valid version X, valid version Y, an invalid version; each by a ConfigMap-style
//! `..data` symlink swap, by write-temp-then-rename and by an in-place write). No request
//! may fail except by the intended 403, every 403 must come from a rule that denies in a
//! version that could have been in force, and decisions must follow each valid write (within
//! a deadline generous for 2 shared cores; the follow times are reported, not asserted).
//! Run with `--nocapture` to see the figures.
//!
//! ```text
//!  load (4 × app A) ──http/1.1 keep-alive──▶ sidecar A ══ mTLS, h2 ══▶ sidecar B ──▶ app B
//!                                                                    ▲
//!  policy dir: ..2026_11_26_NN/policy.yaml, ..data -> ..2026_11_26_NN,
//!              policy.yaml -> ..data/policy.yaml  (or, after a rename, a plain file)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use http::StatusCode;
use trellis_tests::app_client::{AppConn, Proto};
use trellis_tests::e2e;
use trellis_tests::policy_mesh::{PolicyMesh, B_HOST, SERVICE_A};

/// Allowed by both versions.
const P1: &str = "/p1/item";
/// Allowed by Y, denied by X (rule `x-deny-p2`).
const P2: &str = "/p2/item";
const X_DENY_RULE: &str = "x-deny-p2";
/// Concurrent load connections.
const LOAD_TASKS: usize = 4;
/// Policy writes (7 rounds of X, Y, invalid).
const WRITES: usize = 21;
/// Time between the starts of two writes.
const WRITE_EVERY: Duration = Duration::from_millis(480);
/// How long after a valid write the decision must have changed: a deadline for "it follows",
/// not a speed target (the follow times are printed; they are ~100-300 ms here).
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);
/// One load request, head and body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RELOAD_ERRORS: &str = "trellis_policy_reload_errors_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    X,
    Y,
    Invalid,
}

fn policy_text(v: Version) -> String {
    match v {
        Version::X => format!(
            "apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
rules:
  - name: x-allow-p1
    action: allow
    from: [{SERVICE_A}]
    to:
      - paths: [/p1/**]
  - name: {X_DENY_RULE}
    action: deny
    from: [{SERVICE_A}]
    to:
      - paths: [/p2/**]
"
        ),
        Version::Y => format!(
            "apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
rules:
  - name: y-allow-both
    action: allow
    from: [{SERVICE_A}]
    to:
      - paths: [/p1/**, /p2/**]
"
        ),
        // A syntax error: the list is never closed.
        Version::Invalid => format!(
            "apiVersion: trellis.io/v1
kind: Policy
defaultAction: allow
rules:
  - name: broken
    action: deny
    from: [{SERVICE_A}
    to:
      - paths: [/p1/**
"
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// Kubernetes' atomic ConfigMap update.
    SymlinkSwap,
    /// An editor's save: write a temporary file, rename it over `policy.yaml`.
    Rename,
    /// Truncate and rewrite `policy.yaml` itself.
    InPlace,
}

/// The policy directory sidecar B watches (`--policy DIR`), laid out like a ConfigMap
/// volume.
struct PolicyDir {
    dir: PathBuf,
    swaps: u32,
}

impl PolicyDir {
    fn create(dir: &Path, text: &str) -> anyhow::Result<Self> {
        let mut pd = PolicyDir {
            dir: dir.to_owned(),
            swaps: 0,
        };
        pd.swap(text)?;
        std::os::unix::fs::symlink("..data/policy.yaml", pd.file())?;
        Ok(pd)
    }

    fn file(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    fn write(&mut self, kind: WriteKind, text: &str) -> anyhow::Result<()> {
        match kind {
            WriteKind::SymlinkSwap => {
                self.swap(text)?;
                // After an editor replaced the link with a file, the volume layout comes
                // back: the link is renamed over the file (atomic).
                if !std::fs::symlink_metadata(self.file())?.is_symlink() {
                    let tmp = self.dir.join(".policy.yaml.link");
                    std::os::unix::fs::symlink("..data/policy.yaml", &tmp)?;
                    std::fs::rename(&tmp, self.file())?;
                }
            }
            WriteKind::Rename => {
                let tmp = self.dir.join(".policy.yaml.tmp");
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, self.file())?;
            }
            WriteKind::InPlace => {
                ensure!(
                    !std::fs::symlink_metadata(self.file())?.is_symlink(),
                    "an in-place write through the ..data link would edit the timestamped directory"
                );
                std::fs::write(self.file(), text)?;
            }
        }
        Ok(())
    }

    /// A new timestamped directory, `..data` renamed over to point at it, the old one
    /// removed: what the kubelet does.
    fn swap(&mut self, text: &str) -> anyhow::Result<()> {
        self.swaps += 1;
        let data = format!("..2026_11_26_{:02}", self.swaps);
        std::fs::create_dir(self.dir.join(&data))?;
        std::fs::write(self.dir.join(&data).join("policy.yaml"), text)?;
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp)?;
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }
}

/// What one request got.
#[derive(Debug, Clone)]
struct Outcome {
    path: &'static str,
    sent: Instant,
    done: Instant,
    result: Result<Decided, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decided {
    Allowed,
    Denied(String),
}

/// One request on `conn`: 200 with app B's echo of `path`, or the sidecar's 403; anything
/// else (another status, a wrong echo, an error, a timeout) is a failure.
async fn one_request(conn: &mut AppConn, path: &'static str) -> Outcome {
    let sent = Instant::now();
    let result = match tokio::time::timeout(REQUEST_TIMEOUT, conn.get(B_HOST, path, &[])).await {
        Err(_) => Err(format!("no response within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Ok(Ok(reply)) => match reply.status {
            StatusCode::OK => match reply.json() {
                Ok(echo) if echo["app"] == "app-b" && echo["path"] == path => Ok(Decided::Allowed),
                _ => Err(format!("200 that is not app B's echo: {}", reply.summary())),
            },
            StatusCode::FORBIDDEN => match reply.json() {
                Ok(body)
                    if body["error"] == "forbidden"
                        && body["caller"] == SERVICE_A
                        && body["rule"].is_string() =>
                {
                    Ok(Decided::Denied(
                        body["rule"].as_str().unwrap_or("").to_owned(),
                    ))
                }
                _ => Err(format!("malformed 403: {}", reply.summary())),
            },
            _ => Err(format!("unexpected {}", reply.summary())),
        },
    };
    Outcome {
        path,
        sent,
        done: Instant::now(),
        result,
    }
}

/// A load connection: requests without pause, alternating P1 and P2, until `stop`. A
/// broken connection is counted (by its failed request) and replaced.
async fn load(addr: std::net::SocketAddr, first: usize, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut conn = None;
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        let path = [P1, P2][i % 2];
        i += 1;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match AppConn::connect(addr, Proto::H1).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    let now = Instant::now();
                    out.push(Outcome {
                        path,
                        sent: now,
                        done: now,
                        result: Err(format!("connect: {e:#}")),
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let o = one_request(c, path).await;
        if o.result.is_err() {
            conn = None;
        }
        out.push(o);
    }
    out
}

/// A valid version and when it was written and seen in force.
#[derive(Debug, Clone, Copy)]
struct Applied {
    version: Version,
    /// When the write began (the earliest it can take effect).
    written: Instant,
    /// When a request first got its decision (from then on it is in force).
    confirmed: Instant,
}

/// The versions that may have decided a request in flight during `[sent, done]`.
fn possible_versions(timeline: &[Applied], sent: Instant, done: Instant) -> Vec<Version> {
    timeline
        .iter()
        .enumerate()
        .filter(|(k, a)| {
            let until = timeline.get(k + 1).map(|next| next.confirmed);
            a.written <= done && until.is_none_or(|u| u >= sent)
        })
        .map(|(_, a)| a.version)
        .collect()
}

/// Why `o` is not an intended outcome, if it is not.
fn judge(timeline: &[Applied], o: &Outcome) -> Option<String> {
    let decided = match &o.result {
        Err(e) => return Some(format!("{} failed: {e}", o.path)),
        Ok(d) => d,
    };
    let versions = possible_versions(timeline, o.sent, o.done);
    let ok = match (o.path, decided) {
        (P1, Decided::Allowed) => true,
        (P2, Decided::Allowed) => versions.contains(&Version::Y),
        (P2, Decided::Denied(rule)) => rule == X_DENY_RULE && versions.contains(&Version::X),
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "{} got {decided:?} while {versions:?} could be in force",
            o.path
        )
    })
}

/// The expected decision on P2 under `v`.
fn p2_decision(v: Version) -> Decided {
    match v {
        Version::X => Decided::Denied(X_DENY_RULE.to_owned()),
        _ => Decided::Allowed,
    }
}

async fn reload_errors(mesh: &PolicyMesh) -> anyhow::Result<f64> {
    Ok(mesh.b_metrics().await?.sum(RELOAD_ERRORS, &[]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_follow_every_valid_write_and_no_request_fails() -> anyhow::Result<()> {
    e2e(async {
        let test_start = Instant::now();
        let tmp = tempfile::tempdir()?;
        let mut pd = PolicyDir::create(tmp.path(), &policy_text(Version::Y))?;
        let mesh = PolicyMesh::start(tmp.path(), None).await?;
        let a = mesh.a.outbound();
        let mut timeline = vec![Applied {
            version: Version::Y,
            written: test_start,
            confirmed: test_start,
        }];
        let status = mesh.policy_status().await?;
        ensure!(status["loaded"] == true, "/policy: {status}");
        let mut hash = status["hash"].clone();

        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..LOAD_TASKS)
            .map(|t| tokio::spawn(load(a, t, stop.clone())))
            .collect();
        let mut probe = AppConn::connect(a, Proto::H1).await?;
        let mut probes = Vec::new();
        let mut follow_times = Vec::new();
        let mut errors_seen = 0usize;
        let load_start = Instant::now();

        for i in 0..WRITES {
            let version = [Version::X, Version::Y, Version::Invalid][i % 3];
            let kind = [
                WriteKind::SymlinkSwap,
                WriteKind::Rename,
                WriteKind::InPlace,
            ][(i / 3) % 3];
            let next_write = load_start + WRITE_EVERY * (i as u32 + 1);
            let errors_before = reload_errors(&mesh).await?;
            let written = Instant::now();
            pd.write(kind, &policy_text(version))
                .with_context(|| format!("write {i}: {version:?} by {kind:?}"))?;
            let write_done = Instant::now();

            if version == Version::Invalid {
                // Refused and counted...
                let deadline = write_done + Duration::from_secs(3);
                loop {
                    if reload_errors(&mesh).await? > errors_before {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "write {i} (invalid, {kind:?}): {RELOAD_ERRORS} did not move"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                errors_seen += 1;
                // ...and nothing changed.
                let status = mesh.policy_status().await?;
                ensure!(
                    status["hash"] == hash && status["last_error"].is_string(),
                    "write {i} (invalid, {kind:?}): /policy {status}, want hash {hash}"
                );
                let in_force = timeline.last().map_or(Version::Y, |t| t.version);
                let o = one_request(&mut probe, P2).await;
                ensure!(
                    o.result.as_ref().ok() == Some(&p2_decision(in_force)),
                    "write {i} (invalid, {kind:?}): P2 got {:?} under {in_force:?}",
                    o.result
                );
                probes.push(o);
            } else {
                // The next requests on P2 get the new decision (polled until FOLLOW_WITHIN).
                let want = p2_decision(version);
                let confirmed = loop {
                    let o = one_request(&mut probe, P2).await;
                    let hit = o.result.as_ref().ok() == Some(&want);
                    let done = o.done;
                    if let Err(e) = &o.result {
                        bail!("write {i} ({version:?}, {kind:?}): probe failed: {e}");
                    }
                    probes.push(o);
                    if hit {
                        break done;
                    }
                    ensure!(
                        done - write_done < FOLLOW_WITHIN,
                        "write {i} ({version:?}, {kind:?}): P2 still not {want:?} after {:?}",
                        done - write_done
                    );
                };
                follow_times.push(confirmed - write_done);
                timeline.push(Applied {
                    version,
                    written,
                    confirmed,
                });
                let status = mesh.policy_status().await?;
                ensure!(
                    status["hash"] != hash,
                    "write {i}: new decisions but the same hash: {status}"
                );
                hash = status["hash"].clone();
            }
            tokio::time::sleep_until(next_write.into()).await;
        }

        stop.store(true, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.extend(t.await?);
        }
        let elapsed = load_start.elapsed();
        let total_reload_errors = reload_errors(&mesh).await?;

        let bad: Vec<String> = outcomes
            .iter()
            .chain(&probes)
            .filter_map(|o| judge(&timeline, o))
            .collect();
        let forbidden = outcomes
            .iter()
            .filter(|o| matches!(o.result, Ok(Decided::Denied(_))))
            .count();
        let allowed = outcomes
            .iter()
            .filter(|o| matches!(o.result, Ok(Decided::Allowed)))
            .count();
        let max_follow = follow_times.iter().max().copied().unwrap_or_default();
        let mean_follow = follow_times.iter().sum::<Duration>() / follow_times.len().max(1) as u32;
        println!(
            "reload under load: {} load requests in {elapsed:.1?} ({:.0}/s) over {LOAD_TASKS} \
             connections, {allowed} × 200, {forbidden} × 403, {} failures or wrong decisions; \
             {} probe requests; {WRITES} writes: {} valid reloads applied, {errors_seen} invalid \
             refused ({RELOAD_ERRORS} = {total_reload_errors}); write → decision change: max \
             {max_follow:?}, mean {mean_follow:?}",
            outcomes.len(),
            outcomes.len() as f64 / elapsed.as_secs_f64(),
            bad.len(),
            probes.len(),
            timeline.len() - 1,
        );
        ensure!(
            bad.is_empty(),
            "{} requests failed or got a decision no version in force gives; first ones:\n{}",
            bad.len(),
            bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        );
        ensure!(forbidden > 0 && allowed > 0, "the load saw no variety");
        ensure!(max_follow < FOLLOW_WITHIN, "max follow {max_follow:?}");
        Ok(())
    })
    .await
}
