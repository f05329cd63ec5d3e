//! The issuance transparency log through a real `trellis control`: SVIDs issued over SDS are
//! logged and provable (`trellis log prove`, and an independent RFC 9162 verifier written in
//! Python from the RFC's text alone), a monitor (`trellis log watch`) flags an identity
//! nobody expected, and `trellis log verify` names every kind of tampering with the stored
//! log; a control plane refuses to start on a log that fails its own signed head.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use trellis_tests::{
    control_must_fail_to_start, e2e, eventually, fetch_svid, run_with_timeout, trellis_bin,
    workspace_root, Child, ControlPlane, ControlPlaneOpts,
};

const WAIT: Duration = Duration::from_secs(30);

fn trellis(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tests/tools/rfc9162.py` with `args`: exit 0 verified, 1 refused.
fn independent(args: &[String]) -> anyhow::Result<i32> {
    let mut cmd = Command::new("python3");
    cmd.arg(workspace_root().join("tests/tools/rfc9162.py"))
        .args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    out.status.code().context("python3 killed")
}

async fn json(cp: &ControlPlane, path: &str) -> anyhow::Result<Value> {
    let r = cp.admin_get(path).await?;
    ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
    Ok(serde_json::from_str(&r.text())?)
}

/// Waits for a signed head covering at least `size` entries.
async fn head_of_at_least(cp: &ControlPlane, size: u64) -> anyhow::Result<Value> {
    eventually(WAIT, "a signed head over the new entries", || async {
        let sth = json(cp, "/log/sth").await?;
        let got = sth["tree_size"].as_u64().context("tree_size")?;
        ensure!(got >= size, "head covers {got} entries, want ≥ {size}");
        Ok(sth)
    })
    .await
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_svids_are_proven_watched_and_tampering_is_named() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let admin = cp.admin_addr.to_string();
        let mut serials = Vec::new();
        for name in ["ns/prod/sa/web", "ns/prod/sa/db", "ns/dev/sa/tool"] {
            let token = cp.create_token(&format!("spiffe://example.org/{name}"), "1h")?;
            let (svid, _) = fetch_svid(&cp, &token).await?;
            serials.push(svid.serial_hex().to_owned());
        }
        // The embedded CA becoming active, the control plane's own SVID, the three SVIDs.
        let head = head_of_at_least(&cp, 5).await?;
        let size = head["tree_size"].as_u64().context("size")?;

        // `trellis log prove` against the running control plane.
        let out = trellis(&["log", "prove", "--admin", &admin, "--serial", &serials[0]])?;
        ensure!(out.status.success(), "prove: {}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            stdout.contains("spiffe://example.org/ns/prod/sa/web") && stdout.contains("proven"),
            "{stdout}"
        );
        let out = trellis(&["log", "prove", "--admin", &admin, "--serial", "0123abcd"])?;
        ensure!(
            out.status.code() == Some(2),
            "unknown serial: {}",
            show(&out)
        );

        // The same proof, checked by code that shares nothing with ours.
        let inc = json(&cp, &format!("/log/inclusion?serial={}", serials[1])).await?;
        let root = inc["head"]["root_hash"]
            .as_str()
            .context("root")?
            .to_owned();
        let mut args = vec![
            "inclusion".to_owned(),
            inc["index"].to_string(),
            inc["tree_size"].to_string(),
            inc["leaf_hash"].as_str().context("leaf")?.to_owned(),
            root.clone(),
        ];
        args.extend(strings(&inc["proof"]));
        ensure!(independent(&args)? == 0, "rfc9162.py refused {inc}");
        // A wrong root is refused by it, so the check above can fail.
        let mut wrong = args.clone();
        wrong[4] = inc["leaf_hash"].as_str().context("leaf")?.to_owned();
        ensure!(
            independent(&wrong)? == 1,
            "rfc9162.py accepted a wrong root"
        );

        // A later head is consistent with the earlier one, per the independent verifier.
        let token = cp.create_token("spiffe://example.org/ns/prod/sa/api", "1h")?;
        fetch_svid(&cp, &token).await?;
        let later = head_of_at_least(&cp, size + 1).await?;
        let second = later["tree_size"].as_u64().context("size")?;
        let cons = json(
            &cp,
            &format!("/log/consistency?first={size}&second={second}"),
        )
        .await?;
        let mut args = vec![
            "consistency".to_owned(),
            size.to_string(),
            second.to_string(),
            head["root_hash"].as_str().context("root")?.to_owned(),
            later["root_hash"].as_str().context("root")?.to_owned(),
        ];
        args.extend(strings(&cons["proof"]));
        ensure!(
            independent(&args)? == 0,
            "rfc9162.py refused consistency {cons}"
        );

        // A monitor that expects only prod identities (and the control plane's own) flags
        // the dev one, by name; one that expects all of them passes.
        let out = trellis(&[
            "log",
            "watch",
            "--admin",
            &admin,
            "--once",
            "--expect",
            "spiffe://example.org/ns/**",
            "spiffe://example.org/trellis/**",
        ])?;
        ensure!(out.status.success(), "watch: {}", show(&out));
        let out = trellis(&[
            "log",
            "watch",
            "--admin",
            &admin,
            "--once",
            "--expect",
            "spiffe://example.org/ns/prod/**",
            "spiffe://example.org/trellis/**",
        ])?;
        ensure!(out.status.code() == Some(1), "watch: {}", show(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr).contains("spiffe://example.org/ns/dev/sa/tool"),
            "{}",
            show(&out)
        );

        // Offline: stop the control plane and check the stored log, then tamper with it.
        let state = cp.state_dir.clone();
        let stopped = cp.kill();
        let dir = stopped.dir.path().to_path_buf();
        let state_arg = state.to_string_lossy().into_owned();
        // The public key the control plane wrote next to bundle.pem, pinned as an auditor would.
        let key_arg = state.join("log-key.pem").to_string_lossy().into_owned();
        let verify = || {
            trellis(&[
                "log",
                "verify",
                "--state-dir",
                &state_arg,
                "--log-key",
                &key_arg,
            ])
        };
        let out = verify()?;
        ensure!(out.status.success(), "verify: {}", show(&out));
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains("verified:"),
            "{}",
            show(&out)
        );

        tamper_cases(&state.join("trellis.db"), verify)?;

        // A forged entry with a matching leaf hash: verify names the head, and the control
        // plane refuses to start on it.
        let db = rusqlite::Connection::open(state.join("trellis.db"))?;
        let (entry, _): (Vec<u8>, Vec<u8>) = db.query_row(
            "SELECT entry, leaf_hash FROM log_entries WHERE idx = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut forged = entry.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let forged_hash = trellis_transparency::leaf_hash(&forged);
        db.execute(
            "UPDATE log_entries SET entry = ?1, leaf_hash = ?2 WHERE idx = 1",
            rusqlite::params![forged, forged_hash.as_slice()],
        )?;
        let out = verify()?;
        ensure!(out.status.code() == Some(1), "{}", show(&out));
        ensure!(
            String::from_utf8_lossy(&out.stderr)
                .contains("the entries do not produce the signed root"),
            "{}",
            show(&out)
        );
        let stderr = control_must_fail_to_start(&dir, &[] as &[&str])?;
        ensure!(stderr.contains("trellis log verify"), "{stderr}");
        Ok(())
    })
    .await
}

/// Each tampering, undone after its check: verify exits 1 and names what was done.
fn tamper_cases(db_path: &Path, verify: impl Fn() -> anyhow::Result<Output>) -> anyhow::Result<()> {
    let db = rusqlite::Connection::open(db_path)?;
    let row = |idx: i64| -> anyhow::Result<(Vec<u8>, Vec<u8>, Option<String>)> {
        Ok(db.query_row(
            "SELECT entry, leaf_hash, serial FROM log_entries WHERE idx = ?1",
            [idx],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    };
    let put = |idx: i64, r: &(Vec<u8>, Vec<u8>, Option<String>)| -> anyhow::Result<()> {
        db.execute(
            "INSERT OR REPLACE INTO log_entries (idx, entry, leaf_hash, serial) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![idx, r.0, r.1, r.2],
        )?;
        Ok(())
    };
    let expect = |want: &str| -> anyhow::Result<()> {
        let out = verify()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && stderr.contains(want),
            "want `{want}`: {}",
            show(&out)
        );
        eprintln!("tampering named: {}", stderr.trim());
        Ok(())
    };
    let (two, three) = (row(2)?, row(3)?);

    // An edited entry.
    let mut edited = two.clone();
    let last = edited.0.len() - 1;
    edited.0[last] ^= 1;
    put(2, &edited)?;
    expect("entry 2: does not match the leaf hash recorded")?;
    put(2, &two)?;

    // A deleted entry.
    db.execute("DELETE FROM log_entries WHERE idx = 2", [])?;
    expect("entry 2: missing (the next stored entry is 3)")?;
    put(2, &two)?;

    // Two entries swapped (each with its own leaf hash).
    put(2, &three)?;
    put(3, &two)?;
    expect("entry 2: records index 3")?;
    put(2, &two)?;
    put(3, &three)?;

    // A truncated log (the last entry is covered by the last head: the caller waited).
    let max: i64 = db.query_row("SELECT MAX(idx) FROM log_entries", [], |r| r.get(0))?;
    let covered: i64 = db.query_row("SELECT MAX(tree_size) FROM log_heads", [], |r| r.get(0))?;
    ensure!(
        covered == max + 1,
        "the last head covers {covered} of {} entries",
        max + 1
    );
    let tail = row(max)?;
    db.execute("DELETE FROM log_entries WHERE idx = ?1", [max])?;
    expect("it was truncated")?;
    put(max, &tail)?;

    // A head with a bad signature.
    let (size, sig): (i64, Vec<u8>) = db.query_row(
        "SELECT tree_size, signature FROM log_heads ORDER BY tree_size LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut bad = sig.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    db.execute(
        "UPDATE log_heads SET signature = ?1 WHERE tree_size = ?2",
        rusqlite::params![bad, size],
    )?;
    expect(&format!(
        "head for size {size}: the head's signature does not verify"
    ))?;
    db.execute(
        "UPDATE log_heads SET signature = ?1 WHERE tree_size = ?2",
        rusqlite::params![sig, size],
    )?;

    let out = verify()?;
    ensure!(out.status.success(), "restored log: {}", show(&out));
    Ok(())
}

/// `trellis_log_witness_alarms_total{kind}` of a sidecar.
async fn witness_alarms(s: &trellis_tests::sidecar::Sidecar, kind: &str) -> anyhow::Result<f64> {
    let m = trellis_tests::metrics::Metrics::parse(&s.admin_get("/metrics").await?.text())?;
    Ok(m.sum_or_zero("trellis_log_witness_alarms_total", &[("kind", kind)]))
}

/// `/certs`' `transparency_log.witnessed_size` of a sidecar (0 before the first head).
async fn witnessed(s: &trellis_tests::sidecar::Sidecar) -> anyhow::Result<u64> {
    let v: Value = serde_json::from_str(&s.admin_get("/certs").await?.text())?;
    Ok(v["transparency_log"]["witnessed_size"]
        .as_u64()
        .unwrap_or(0))
}

/// B, alarmed, stays ready with `alarm` in its `/ready` body, and A → B still works.
async fn still_serving_with_the_alarm(
    mesh: &trellis_tests::mesh::Mesh,
    alarm: &str,
    path: &str,
) -> anyhow::Result<()> {
    let ready = mesh.b.admin_get("/ready").await?;
    ensure!(
        ready.status == 200 && ready.text().contains(alarm),
        "an alarm must not take the sidecar out, and /ready must carry it ({alarm}): {} {}",
        ready.status,
        ready.text()
    );
    let reply = trellis_tests::app_client::get_once(
        mesh.a.outbound(),
        trellis_tests::app_client::Proto::H1,
        "b",
        path,
        &[],
    )
    .await?;
    ensure!(
        reply.status == 200,
        "traffic after the alarm: {}",
        reply.summary()
    );
    Ok(())
}

/// Every sidecar is a witness: with each SDS update it gets the latest signed head and checks
/// it extends the last one it accepted. The control plane is then rolled back to a copy of
/// its state directory taken earlier (a restored backup: everything issued since is gone from
/// its log): the sidecars notice and say so, while traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_witness_the_log_and_alarm_on_a_rollback() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = trellis_tests::mesh::Mesh::start(trellis_tests::mesh::MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("1h".into()),
                rotate_every: Some("1s".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;
        // B witnesses heads that grow with its own rotations, each proven from the last.
        let first = eventually(WAIT, "B witnesses a head", || async {
            let n = witnessed(&mesh.b).await?;
            ensure!(n > 0, "nothing witnessed yet");
            Ok(n)
        })
        .await?;
        let grown = eventually(WAIT, "B witnesses a larger head", || async {
            let n = witnessed(&mesh.b).await?;
            ensure!(n >= first + 3, "witnessed {n}, first {first}");
            Ok(n)
        })
        .await?;
        for kind in ["rollback", "fork", "key_changed", "bad_signature", "malformed"] {
            ensure!(witness_alarms(&mesh.b, kind).await? == 0.0, "an alarm ({kind}) on an honest log");
        }
        let sth = json(&mesh.cp, "/log/sth").await?;
        ensure!(
            sth["tree_size"].as_u64().unwrap_or(0) >= grown,
            "B witnessed {grown} entries, more than the control plane's head: {sth}"
        );

        // A backup of the state directory, taken with the control plane stopped.
        let stopped = mesh.cp.kill();
        let state = stopped.dir.path().join("state");
        let backup = stopped.dir.path().join("state-backup");
        let copy = Command::new("cp").arg("-a").arg(&state).arg(&backup).status()?;
        ensure!(copy.success(), "cp -a of the state directory failed");
        mesh.cp = stopped.start_again()?;
        let backed_up = witnessed(&mesh.b).await?;
        eventually(WAIT, "the log grows past the backup", || async {
            let n = witnessed(&mesh.b).await?;
            ensure!(n >= backed_up + 5, "witnessed {n}, backup at {backed_up}");
            Ok(n)
        })
        .await?;

        // Restore the backup: the control plane's log is back where it was.
        let stopped = mesh.cp.kill();
        std::fs::remove_dir_all(&state)?;
        std::fs::rename(&backup, &state)?;
        mesh.cp = stopped.start_again()?;
        let alarm = eventually(WAIT, "B raises a rollback or fork alarm", || async {
            let n = witness_alarms(&mesh.b, "rollback").await? + witness_alarms(&mesh.b, "fork").await?;
            ensure!(n > 0.0, "no alarm yet");
            Ok(n)
        })
        .await?;
        still_serving_with_the_alarm(&mesh, "warning: transparency log alarm", "/after-rollback").await?;
        println!(
            "[log] B witnessed heads up to {grown} entries with no alarm; after the control plane was restored from a backup of {backed_up} entries: {alarm} alarm(s), /ready 200 with the warning, traffic unaffected"
        );
        Ok(())
    })
    .await
}

/// Two control planes of one trust domain forced into a fork: the second runs on a copy of
/// the first's state taken earlier (same CA, same log key), and both go on issuing, so their
/// logs share a prefix and then differ. A sidecar that witnessed the first one's longer
/// history is then served by the second, whose log is larger still: no consistency proof can
/// connect the two, and the sidecar names it a fork (not a rollback), still serving traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_name_a_fork_between_two_control_planes() -> anyhow::Result<()> {
    e2e(async {
        let opts = ControlPlaneOpts {
            svid_ttl: Some("1h".into()),
            rotate_every: Some("1s".into()),
            ..Default::default()
        };
        let mut mesh = trellis_tests::mesh::Mesh::start(trellis_tests::mesh::MeshOpts {
            control: opts.clone(),
            ..Default::default()
        })
        .await?;
        eventually(WAIT, "B witnesses a head", || async {
            let n = witnessed(&mesh.b).await?;
            ensure!(n > 0, "nothing witnessed yet");
            Ok(n)
        })
        .await?;

        // The fork point: a copy of the state, taken with the first control plane stopped.
        let stopped = mesh.cp.kill();
        let fork_dir = tempfile::tempdir()?;
        let copy = Command::new("cp")
            .arg("-a")
            .arg(stopped.dir.path().join("state"))
            .arg(fork_dir.path().join("state"))
            .status()?;
        ensure!(copy.success(), "cp -a of the state directory failed");
        mesh.cp = stopped.start_again()?;
        let fork_size = json(&mesh.cp, "/log/sth").await?["tree_size"].as_u64().unwrap_or(0);
        let seen = eventually(WAIT, "B witnesses the first history growing", || async {
            let n = witnessed(&mesh.b).await?;
            ensure!(n >= fork_size + 4, "witnessed {n}, fork at {fork_size}");
            Ok(n)
        })
        .await?;

        // The second control plane grows its own history past what B has seen.
        let second = ControlPlane::start_in(fork_dir, opts)?;
        let mut grown = 0;
        for i in 0..64 {
            let token = second.create_token(&format!("spiffe://example.org/ns/fork/sa/w{i}"), "10m")?;
            fetch_svid(&second, &token).await?;
            grown = head_of_at_least(&second, 0).await?["tree_size"].as_u64().unwrap_or(0);
            if grown > seen + 2 {
                break;
            }
        }
        ensure!(grown > seen + 2, "the second control plane's log reached only {grown}");

        // B's control plane address now leads to the second one.
        let first = mesh.cp.kill();
        let second = second.kill();
        mesh.cp = trellis_tests::StoppedControlPlane {
            dir: second.dir,
            opts: second.opts,
            sds_addr: first.sds_addr,
            admin_addr: first.admin_addr,
        }
        .start_again()?;
        let forks = eventually(WAIT, "B names the fork", || async {
            let n = witness_alarms(&mesh.b, "fork").await?;
            ensure!(n > 0.0, "no fork alarm yet");
            Ok(n)
        })
        .await?;
        let rollbacks = witness_alarms(&mesh.b, "rollback").await?;
        still_serving_with_the_alarm(&mesh, "(fork)", "/after-fork").await?;
        println!(
            "[log] fork at {fork_size} entries; B had witnessed {seen} of the first history, the second reached {grown}: {forks} fork alarm(s), {rollbacks} rollback alarm(s), /ready 200 with the warning, traffic unaffected"
        );
        drop(first);
        Ok(())
    })
    .await
}

/// `trellis_log_own_svid_checks_total{result}` of a sidecar.
async fn own_svid_checks(s: &trellis_tests::sidecar::Sidecar, result: &str) -> anyhow::Result<f64> {
    let m = trellis_tests::metrics::Metrics::parse(&s.admin_get("/metrics").await?.text())?;
    Ok(m.sum_or_zero("trellis_log_own_svid_checks_total", &[("result", result)]))
}

/// `/certs`' `transparency_log.own_svid.proven_serial` of a sidecar, if any.
async fn proven_serial(s: &trellis_tests::sidecar::Sidecar) -> anyhow::Result<Option<String>> {
    let v: Value = serde_json::from_str(&s.admin_get("/certs").await?.text())?;
    Ok(v["transparency_log"]["own_svid"]["proven_serial"]
        .as_str()
        .map(str::to_owned))
}

/// Each sidecar checks that the SVID it holds is in the log: a second or so after its SVID
/// arrives (once a signed head covers the entry) the control plane sends the entry and its
/// inclusion proof, and the sidecar's `/certs` shows its serial proven. Then the control
/// plane's log is made to lack B's entry: its serial is filed under another SVID issued to
/// the same identity (a CA that issued B a certificate it did not log, and shows B something
/// else instead). Restarted on that state, the control plane proves the wrong entry to B,
/// which raises the `own_svid` alarm and keeps serving; the log itself is intact, so no
/// witness alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_prove_their_own_svid_is_in_the_log() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = trellis_tests::mesh::Mesh::start(trellis_tests::mesh::MeshOpts::default()).await?;
        let started = std::time::Instant::now();
        let serial = mesh.b.svid_serial().await?;
        eventually(WAIT, "B's own SVID proven in the log", || async {
            let proven = proven_serial(&mesh.b).await?;
            ensure!(proven.as_deref() == Some(serial.as_str()), "proven: {proven:?}, holding {serial}");
            Ok(())
        })
        .await?;
        let took = started.elapsed();
        let certs: Value = serde_json::from_str(&mesh.b.admin_get("/certs").await?.text())?;
        ensure!(
            certs["transparency_log"]["own_svid"]["current_proven"] == true,
            "{certs}"
        );
        // The admin endpoint agrees on where the entry is.
        let inc = json(&mesh.cp, &format!("/log/inclusion?serial={serial}")).await?;
        ensure!(
            inc["index"] == certs["transparency_log"]["own_svid"]["proven_index"],
            "admin says {inc}, B says {certs}"
        );
        ensure!(own_svid_checks(&mesh.b, "proven").await? >= 1.0, "no proven check counted");
        ensure!(own_svid_checks(&mesh.b, "mismatch").await? == 0.0, "a mismatch on an honest log");
        eventually(WAIT, "A's own SVID proven too", || async {
            let a = mesh.a.svid_serial().await?;
            ensure!(proven_serial(&mesh.a).await?.as_deref() == Some(a.as_str()), "A not proven yet");
            Ok(())
        })
        .await?;

        // Another SVID for B's identity, nobody's to hold, logged under a head.
        let token = mesh.cp.create_token(trellis_tests::mesh::B_ID, "1h")?;
        let (decoy, _) = fetch_svid(&mesh.cp, &token).await?;
        let decoy = decoy.serial_hex().to_owned();
        eventually(WAIT, "the decoy's entry under a head", || async {
            json(&mesh.cp, &format!("/log/inclusion?serial={decoy}")).await.map(drop)
        })
        .await?;

        // B's serial now leads to the decoy's entry; B's own entry is filed under no serial.
        let stopped = mesh.cp.kill();
        ensure!(mesh.b.svid_serial().await? == serial, "B rotated meanwhile");
        let db = rusqlite::Connection::open(stopped.dir.path().join("state/trellis.db"))?;
        let cleared = db.execute("UPDATE log_entries SET serial = NULL WHERE serial = ?1", [&serial])?;
        let moved = db.execute("UPDATE log_entries SET serial = ?1 WHERE serial = ?2", [&serial, &decoy])?;
        ensure!(cleared == 1 && moved == 1, "tampering hit {cleared} and {moved} rows");
        drop(db);
        mesh.cp = stopped.start_again()?;

        let mismatches = eventually(WAIT, "B raises the own_svid alarm", || async {
            let n = own_svid_checks(&mesh.b, "mismatch").await?;
            ensure!(n > 0.0, "no mismatch yet");
            Ok(n)
        })
        .await?;
        still_serving_with_the_alarm(&mesh, "(own_svid)", "/after-own-svid").await?;
        for kind in ["rollback", "fork", "key_changed", "bad_signature", "malformed"] {
            ensure!(witness_alarms(&mesh.b, kind).await? == 0.0, "a witness alarm ({kind}) on an intact log");
        }
        ensure!(own_svid_checks(&mesh.a, "mismatch").await? == 0.0, "A's entry was not touched");
        println!(
            "[log] B's own SVID proven {:.1}s after the mesh was ready; with its serial filed under another SVID of its identity: {mismatches} own_svid mismatch(es), /ready 200 with the warning, traffic unaffected, no witness alarm",
            took.as_secs_f64()
        );
        Ok(())
    })
    .await
}

/// Reads `watch`'s stdout until a line satisfies `want`; every line read is returned.
fn watch_until(
    watch: &mut Child,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<String>> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = watch
            .stdout_line(left)
            .with_context(|| format!("waiting for {what}; watch printed: {seen:#?}"))?;
        let done = want(&line);
        seen.push(line);
        if done {
            return Ok(seen);
        }
    }
}

/// `head N verified (root …), consistent with head M` → (N, M).
fn consistent_head(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("head ")?;
    let (size, rest) = rest.split_once(" verified (root ")?;
    let prev = rest.split_once("), consistent with head ")?.1;
    Some((size.parse().ok()?, prev.parse().ok()?))
}

/// `trellis log watch` in follow mode (no `--once`) against a live control plane: it reports
/// each new head as consistent with the last one it saw, goes on following across a control
/// plane restart, flags (exit 1) the first issued identity outside `--expect`, and a second
/// watch (no patterns) names the rollback when the control plane comes back from a backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_new_heads_and_flags_unexpected_ids() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let admin = cp.admin_addr.to_string();
        let token = cp.create_token("spiffe://example.org/ns/prod/sa/web", "1h")?;
        fetch_svid(&cp, &token).await?;
        // The CA becoming active, the control plane's own SVID, prod/web.
        let first = head_of_at_least(&cp, 3).await?["tree_size"]
            .as_u64()
            .context("size")?;

        let spawn_watch = |name: &str, expect: &[&str]| {
            let mut cmd = Command::new(trellis_bin());
            cmd.args(["log", "watch", "--admin", &admin, "--interval", "200ms"]);
            if !expect.is_empty() {
                cmd.arg("--expect").args(expect);
            }
            Child::spawn(name, cmd, cp.dir.path())
        };
        let mut watch = spawn_watch(
            "log-watch",
            &[
                "spiffe://example.org/ns/prod/**",
                "spiffe://example.org/trellis/**",
            ],
        )?;
        let mut plain = spawn_watch("log-watch-plain", &[])?;
        for w in [&mut watch, &mut plain] {
            let lines = watch_until(w, "the first head", |l| {
                l.starts_with("head ") && l.ends_with("the first this watch has seen")
            })?;
            ensure!(
                lines.iter().any(|l| l.contains("spiffe://example.org/ns/prod/sa/web")),
                "{lines:#?}"
            );
        }

        // A backup of the state, taken with the control plane stopped (for the rollback
        // below); the watches wait the restart out.
        let stopped = cp.kill();
        let state = stopped.dir.path().join("state");
        let backup = stopped.dir.path().join("state-backup");
        let copy = Command::new("cp").arg("-a").arg(&state).arg(&backup).status()?;
        ensure!(copy.success(), "cp -a of the state directory failed");
        for w in [&watch, &plain] {
            eventually(WAIT, "the watch notices the control plane is away", || async move {
                ensure!(w.stderr().contains("retrying every"), "{}", w.stderr());
                Ok(())
            })
            .await?;
        }
        ensure!(
            watch.try_exit().is_none() && plain.try_exit().is_none(),
            "a watch gave up while the control plane restarted: {}",
            watch.stderr()
        );
        let cp = stopped.start_again()?;

        // New matching issuances: each watch reads the entries and proves the new heads
        // consistent with the last one it verified. A watch that stopped following prints
        // nothing more and fails here.
        let mut biggest = first;
        for name in ["ns/prod/sa/api", "ns/prod/sa/db"] {
            let id = format!("spiffe://example.org/{name}");
            let token = cp.create_token(&id, "1h")?;
            fetch_svid(&cp, &token).await?;
            for w in [&mut watch, &mut plain] {
                let lines = watch_until(w, &format!("the entry of {id}"), |l| l.contains(&id))?;
                let entry: u64 = lines
                    .last()
                    .and_then(|l| l.strip_prefix("entry "))
                    .and_then(|l| l.split(':').next())
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("no entry index in {lines:#?}"))?;
                let lines = watch_until(w, "a head over it", |l| {
                    consistent_head(l).is_some_and(|(size, _)| size > entry)
                })?;
                let (size, prev) = lines
                    .last()
                    .map(String::as_str)
                    .and_then(consistent_head)
                    .context("head")?;
                ensure!(prev >= first && prev < size, "{lines:#?}");
                biggest = biggest.max(size);
            }
        }
        ensure!(
            watch.try_exit().is_none() && plain.try_exit().is_none(),
            "a watch exited"
        );
        ensure!(
            watch.stderr().contains("answers again"),
            "{}",
            watch.stderr()
        );

        // An identity outside the patterns: printed, then named, exit 1.
        let dev = "spiffe://example.org/ns/dev/sa/tool";
        let token = cp.create_token(dev, "1h")?;
        fetch_svid(&cp, &token).await?;
        watch_until(&mut watch, "the dev entry", |l| l.contains(dev))?;
        let status = watch.wait_exit(WAIT).context("watch did not exit on the dev entry")?;
        ensure!(status.code() == Some(1), "watch: {status}\n{}", watch.stderr());
        let stderr = watch.stderr();
        ensure!(
            stderr.contains("verification failed: entry")
                && stderr.contains(&format!("{dev} was issued"))
                && stderr.contains("no --expect pattern allows"),
            "{stderr}"
        );
        watch_until(&mut plain, "a head over the dev entry", |l| {
            consistent_head(l).is_some_and(|(size, _)| size > biggest)
        })?;

        // Restore the backup under the running watch: the log is back where it was.
        let stopped = cp.kill();
        std::fs::remove_dir_all(&state)?;
        std::fs::rename(&backup, &state)?;
        let _cp = stopped.start_again()?;
        let status = plain
            .wait_exit(WAIT)
            .context("watch did not notice the rollback")?;
        ensure!(status.code() == Some(1), "watch: {status}\n{}", plain.stderr());
        ensure!(
            plain.stderr().contains("the log rolled back"),
            "{}",
            plain.stderr()
        );
        println!(
            "[log] watch followed heads {first} → {biggest}+ across a restart, flagged {dev} and named the rollback to the backup"
        );
        Ok(())
    })
    .await
}
