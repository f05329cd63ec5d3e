//! Reliability scenario 7: malformed SDS updates. A scripted SDS server
//! ([`trellis_tests::sds_server`]) stands in for the control plane of a real `trellis sidecar`
//! (B) and pushes one hostile update after another while traffic flows through it:
//!
//! ```text
//!  load (app A) ──▶ sidecar A (identity from files) ══ mTLS ══▶ sidecar B ──▶ echo app B
//!                                                                  ▲
//!  probe (direct mTLS client, fresh handshake per update) ─────────┤
//!                                                                  │ SDS (TLS, gRPC)
//!                                                       scripted SDS server (the test)
//! ```
//!
//! For every bad update the sidecar must NACK it (the next request carries the last accepted
//! `version_info`, the response's nonce and an `error_detail` saying what was wrong), keep
//! presenting the SVID it had (same serial on a fresh handshake, and requests still pass), stay
//! on the same stream, and count it in `trellis_sds_updates_total{result=<reason>}`. A good
//! update afterwards is ACKed and installed. Both key modes run: CSR (the default: the sidecar
//! keeps its key) and `--no-csr` (the control plane sends the key, as for a stock Envoy).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{certs_to_pem, key_to_pem, SpiffeId, Svid};
use trellis_proto::{DiscoveryResponse, SECRET_TYPE_URL};
use trellis_tests::echo::EchoApp;
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::sds_server::{
    any_of, bundle_secret, csr_of, response, secrets_response, tls_secret, LeafSpec, Reply,
    ScriptedStream, SdsServer, TestCa,
};
use trellis_tests::sidecar::{Metrics, Sidecar};
use trellis_tests::{e2e, http_get, peer_leaf, serial_of, tls_client_config, tls_connect};
use trellis_tests::{trellis_bin, STARTUP_TIMEOUT};

const B_PATH: &str = "/ns/test/sa/b";
const A_PATH: &str = "/ns/test/sa/a";
const PROBE_PATH: &str = "/ns/test/sa/probe";
/// Generous: a loaded 2-core machine answers in milliseconds, but never assert on timing.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const JOIN_TOKEN: &str = "trellis-join.scripted-sds-test";
/// How many times the list of hostile updates is pushed.
const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The sidecar makes its key and sends a CSR; responses carry the chain only.
    Csr,
    /// `--no-csr`: responses carry the chain and the key.
    ServerKey,
}

/// What a hostile update is made from.
struct Ctx<'a> {
    ca: &'a TestCa,
    foreign: &'a TestCa,
    mode: Mode,
    /// The CSR the sidecar wants signed (CSR mode).
    csr: Option<String>,
    b_id: String,
}

impl Ctx<'_> {
    /// A response whose `default` is `leaf` signed by `signer` for the sidecar's key (CSR
    /// mode) or a fresh key (server-key mode), and whose `ROOTCA` is `bundle_pem`.
    fn leaf_response(
        &self,
        version: &str,
        signer: &TestCa,
        leaf: &LeafSpec,
        bundle_pem: &str,
    ) -> anyhow::Result<DiscoveryResponse> {
        Ok(match self.mode {
            Mode::Csr => {
                let csr = self.csr.as_deref().context("no CSR from the sidecar")?;
                let chain = signer.sign_csr(csr, leaf)?;
                secrets_response(version, &chain, None, bundle_pem)
            }
            Mode::ServerKey => {
                let (chain, key) = signer.issue(leaf);
                secrets_response(version, &chain, Some(&key), bundle_pem)
            }
        })
    }

    /// A valid key PEM in server-key mode (so only the chain is wrong), none in CSR mode.
    fn key_pem(&self) -> anyhow::Result<Option<String>> {
        Ok(match self.mode {
            Mode::Csr => None,
            Mode::ServerKey => {
                let (_, key) = self.ca.issue(&LeafSpec::new(&self.b_id));
                Some(key_to_pem(&key).to_string())
            }
        })
    }

    /// A response with `chain_pem` as the chain (plus a key in server-key mode) and our bundle.
    fn chain_response(&self, version: &str, chain_pem: &str) -> anyhow::Result<DiscoveryResponse> {
        Ok(response(
            version,
            vec![
                any_of(&tls_secret(chain_pem, self.key_pem()?.as_deref())),
                any_of(&bundle_secret(&self.ca.bundle_pem())),
            ],
        ))
    }

    /// A valid update.
    fn good(&self, version: &str) -> anyhow::Result<DiscoveryResponse> {
        self.leaf_response(
            version,
            self.ca,
            &LeafSpec::new(&self.b_id),
            &self.ca.bundle_pem(),
        )
    }
}

type Make = fn(&Ctx<'_>, &str) -> anyhow::Result<DiscoveryResponse>;

/// One hostile update: what it is, the metric label and a piece of the NACK message we expect.
struct Case {
    kind: &'static str,
    label: &'static str,
    says: &'static str,
    make: Make,
}

/// A PEM block whose body is valid base64 but not a certificate.
const NOT_A_CERT: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n-----END CERTIFICATE-----\n";

fn cases(mode: Mode) -> Vec<Case> {
    let mut cases = Vec::new();
    match mode {
        Mode::Csr => {
            cases.push(Case {
                kind: "certificate for a key the sidecar never sent a CSR for",
                label: "bad_key",
                says: "not for the key of any CSR",
                make: |c, v| {
                    let (chain, _) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    Ok(secrets_response(v, &chain, None, &c.ca.bundle_pem()))
                },
            });
            cases.push(Case {
                kind: "private key in the response (keys must not travel)",
                label: "key_in_response",
                says: "keys must not leave the workload",
                make: |c, v| {
                    let csr = c.csr.as_deref().context("no CSR")?;
                    let chain = c.ca.sign_csr(csr, &LeafSpec::new(&c.b_id))?;
                    let (_, key) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    Ok(secrets_response(v, &chain, Some(&key), &c.ca.bundle_pem()))
                },
            });
        }
        Mode::ServerKey => {
            cases.push(Case {
                kind: "key not matching the certificate",
                label: "bad_key",
                says: "private key does not match",
                make: |c, v| {
                    let (chain, _) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    let (_, other_key) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    Ok(secrets_response(
                        v,
                        &chain,
                        Some(&other_key),
                        &c.ca.bundle_pem(),
                    ))
                },
            });
            cases.push(Case {
                kind: "garbage private key PEM",
                label: "bad_key",
                says: "private_key: malformed PEM",
                make: |c, v| {
                    let (chain, _) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    Ok(response(
                        v,
                        vec![
                            any_of(&tls_secret(
                                &certs_to_pem(&chain),
                                Some("-----BEGIN PRIVATE KEY-----\nnot a key!\n-----END PRIVATE KEY-----\n"),
                            )),
                            any_of(&bundle_secret(&c.ca.bundle_pem())),
                        ],
                    ))
                },
            });
            cases.push(Case {
                kind: "no private key (--no-csr needs one)",
                label: "no_key",
                says: "has no private_key",
                make: |c, v| {
                    let (chain, _) = c.ca.issue(&LeafSpec::new(&c.b_id));
                    Ok(secrets_response(v, &chain, None, &c.ca.bundle_pem()))
                },
            });
        }
    }
    cases.extend([
        Case {
            kind: "certificate with the wrong SPIFFE ID",
            label: "wrong_identity",
            says: "spiffe://example.org/ns/test/sa/admin",
            make: |c, v| {
                let leaf = LeafSpec::new(&c.ca.id("/ns/test/sa/admin"));
                c.leaf_response(v, c.ca, &leaf, &c.ca.bundle_pem())
            },
        },
        Case {
            kind: "expired certificate",
            label: "expired",
            says: "it expired 1m",
            make: |c, v| {
                let leaf = LeafSpec::new(&c.b_id).expired();
                c.leaf_response(v, c.ca, &leaf, &c.ca.bundle_pem())
            },
        },
        Case {
            kind: "certificate not valid yet (clock skew)",
            label: "not_yet_valid",
            says: "not valid for another",
            make: |c, v| {
                let leaf = LeafSpec::new(&c.b_id).not_yet_valid();
                c.leaf_response(v, c.ca, &leaf, &c.ca.bundle_pem())
            },
        },
        Case {
            kind: "certificate from a foreign CA (not in the bundle)",
            label: "unknown_ca",
            says: "does not chain to the trust bundle",
            make: |c, v| c.leaf_response(v, c.foreign, &LeafSpec::new(&c.b_id), &c.ca.bundle_pem()),
        },
        Case {
            kind: "bundle without the SVID's CA",
            label: "unknown_ca",
            says: "does not chain to the trust bundle",
            make: |c, v| c.leaf_response(v, c.ca, &LeafSpec::new(&c.b_id), &c.foreign.bundle_pem()),
        },
        Case {
            kind: "garbage PEM",
            label: "malformed",
            says: "certificate_chain",
            make: |c, v| {
                c.chain_response(
                    v,
                    "-----BEGIN CERTIFICATE-----\nthis is not base64!\n-----END CERTIFICATE-----\n",
                )
            },
        },
        Case {
            kind: "chain that is not PEM at all",
            label: "malformed",
            says: "no CERTIFICATE found",
            make: |c, v| c.chain_response(v, "hello, I am not a certificate"),
        },
        Case {
            kind: "PEM block that is not X.509",
            label: "malformed",
            says: "not valid X.509",
            make: |c, v| c.chain_response(v, NOT_A_CERT),
        },
        Case {
            kind: "empty bundle",
            label: "bad_bundle",
            says: "secret `ROOTCA`",
            make: |c, v| {
                let good = c.good(v)?;
                let mut r = response(v, vec![good.resources[0].clone()]);
                r.resources.push(any_of(&bundle_secret("")));
                Ok(r)
            },
        },
        Case {
            kind: "truncated Secret protobuf",
            label: "malformed",
            says: "is not a Secret",
            make: |c, v| {
                let mut r = c.good(v)?;
                let half = r.resources[0].value.len() / 2;
                r.resources[0].value.truncate(half);
                Ok(r)
            },
        },
        Case {
            kind: "resource with the wrong type_url",
            label: "wrong_type",
            says: "type_url",
            make: |c, v| {
                let mut r = c.good(v)?;
                r.resources[0].type_url =
                    "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
                Ok(r)
            },
        },
        Case {
            kind: "response without ROOTCA",
            label: "missing_secret",
            says: "missing secret `ROOTCA`",
            make: |c, v| {
                let mut r = c.good(v)?;
                r.resources.truncate(1);
                Ok(r)
            },
        },
    ]);
    cases
}

/// A fresh mTLS handshake with B's inbound as `probe`, then `GET /probe` on it: the serial B
/// presented (the request must reach app B).
async fn probe(b: &Sidecar, ca: &TestCa, probe: &Svid) -> anyhow::Result<String> {
    // A new config per probe: no session resumption, so B presents its current certificate.
    let config = tls_client_config(
        ca.bundle(),
        PeerMatch::Exact(SpiffeId::parse(&b.spiffe_id)?),
        Some(probe),
        &[b"http/1.1"],
    )?;
    let tls = tls_connect(b.addrs.inbound, config).await?;
    let serial = serial_of(&peer_leaf(&tls)?)?;
    let r = http_get(tls, "b", "/probe").await?;
    ensure!(
        r.status == 200 && r.text().contains("app-b"),
        "GET /probe through B: {} {}",
        r.status,
        r.text()
    );
    Ok(serial)
}

fn updates(m: &Metrics, result: &str) -> f64 {
    m.sum_or_zero("trellis_sds_updates_total", &[("result", result)])
}

fn serial_of_response(r: &DiscoveryResponse) -> anyhow::Result<String> {
    let secrets = trellis_tests::decode_secrets(r)?;
    let Some(trellis_proto::secret::Type::TlsCertificate(tc)) =
        secrets.get("default").and_then(|s| s.r#type.clone())
    else {
        bail!("no default secret");
    };
    let Some(trellis_proto::data_source::Specifier::InlineBytes(pem)) =
        tc.certificate_chain.and_then(|d| d.specifier)
    else {
        bail!("no inline chain");
    };
    let chain = trellis_identity::certs_from_pem(&pem)?;
    serial_of(&chain[0])
}

/// Pushes `resp` and returns the sidecar's answer, failing if the stream ended.
async fn push(stream: &mut ScriptedStream, resp: DiscoveryResponse) -> anyhow::Result<Reply> {
    stream.push_and_wait(resp, REPLY_TIMEOUT).await
}

struct Row {
    kind: &'static str,
    label: &'static str,
    message: String,
}

async fn scenario(mode: Mode) -> anyhow::Result<()> {
    let ca = TestCa::root("example.org");
    let foreign = TestCa::root("example.org");
    let b_id = ca.id(B_PATH);
    let mut server = SdsServer::start(&ca).await?;
    let log_dir = server.dir.path().to_path_buf();
    let app_b = EchoApp::start("app-b").await?;

    // Sidecar B, under test: identity from the scripted server.
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(["--trust-domain", "example.org"])
        .args(["--control-plane", &server.addr.to_string()])
        .arg("--control-bundle")
        .arg(&server.bundle_path)
        .args(["--spiffe-id", &b_id])
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--app", &app_b.addr.to_string()])
        .env("TRELLIS_JOIN_TOKEN", JOIN_TOKEN);
    if mode == Mode::ServerKey {
        cmd.arg("--no-csr");
    }
    let mut b = tokio::task::block_in_place(|| Sidecar::launch("sidecar-b", &b_id, cmd, &log_dir))?;

    // The first request: the names (the log head too: the sidecar witnesses the log), the
    // join token, and the CSR in CSR mode.
    let mut stream = server.next_stream(STARTUP_TIMEOUT).await?;
    let first = stream.request(REPLY_TIMEOUT).await?;
    ensure!(
        first.resource_names == ["default", "ROOTCA", "trellis-log-head"],
        "asked for {:?}",
        first.resource_names
    );
    ensure!(first.type_url == SECRET_TYPE_URL);
    ensure!(
        stream.authorization.as_deref() == Some(&*format!("Bearer {JOIN_TOKEN}")),
        "authorization {:?}",
        stream.authorization
    );
    ensure!(
        first.node.as_ref().map(|n| n.id.as_str()) == Some(b_id.as_str()),
        "node {:?}",
        first.node
    );
    ensure!(
        csr_of(&first).is_some() == (mode == Mode::Csr),
        "CSR in node metadata: {:?} in {mode:?} mode",
        csr_of(&first).is_some()
    );
    let ctx = |csr: Option<String>| Ctx {
        ca: &ca,
        foreign: &foreign,
        mode,
        csr,
        b_id: b_id.clone(),
    };

    // A bad update before any good one: NACKed with an empty version, and B is not ready.
    let bad = ctx(csr_of(&first)).leaf_response(
        "v0",
        &foreign,
        &LeafSpec::new(&b_id),
        &ca.bundle_pem(),
    )?;
    let nack = push(&mut stream, bad).await?;
    ensure!(
        !nack.is_ack() && nack.version().is_empty(),
        "a bad first update: version {:?}, error {:?}",
        nack.version(),
        nack.request.error_detail
    );
    let ready = b.admin_get("/ready").await?;
    ensure!(
        ready.status != 200,
        "B is ready without an SVID: {}",
        ready.text()
    );

    // A good SVID and bundle: ACKed, and B turns ready.
    let v1 = ctx(csr_of(&first)).good("v1")?;
    let v1_serial = serial_of_response(&v1)?;
    let ack = push(&mut stream, v1).await?;
    ensure!(
        ack.is_ack() && ack.version() == "v1",
        "first update: {:?}",
        ack.request.error_detail
    );
    b.wait_ready().await?;

    // Client sidecar A (identity from files) and a load through A → B.
    let a_svid = ca.svid(A_PATH);
    let files = server.dir.path();
    std::fs::write(files.join("a.pem"), certs_to_pem(a_svid.chain()))?;
    std::fs::write(files.join("a-key.pem"), key_to_pem(a_svid.key()).as_bytes())?;
    std::fs::write(files.join("bundle.pem"), ca.bundle_pem())?;
    let app_a = EchoApp::start("app-a").await?;
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(["--trust-domain", "example.org"])
        .arg("--cert")
        .arg(files.join("a.pem"))
        .arg("--key")
        .arg(files.join("a-key.pem"))
        .arg("--bundle")
        .arg(files.join("bundle.pem"))
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--app", &app_a.addr.to_string()])
        .args([
            "--upstream",
            &format!("name=b,hosts=b,address={},identity={b_id}", b.addrs.inbound),
        ]);
    let a = Sidecar::spawn("sidecar-a", &ca.id(A_PATH), cmd, &log_dir).await?;
    let mut opts = LoadOpts::new(a.outbound(), "b", "app-b");
    // Two tests of this file and other agents share two cores: keep the load moderate.
    opts.connections = 2;
    opts.pause = Duration::from_millis(2);
    let load = Load::start(opts);

    let prober = ca.svid(PROBE_PATH);
    let serial = probe(&b, &ca, &prober).await?;
    ensure!(
        serial == v1_serial,
        "B presents {serial}, v1 was {v1_serial}"
    );
    let m = b.metrics().await?;
    ensure!(
        updates(&m, "ok") == 1.0,
        "{}",
        m.lines_of("trellis_sds_updates_total")
    );

    // The hostile updates, one at a time; the whole list several times over, so a repeated
    // bad update is NACKed again and nothing accumulates.
    let phase = load.mark("malformed updates");
    let mut rows = Vec::new();
    let mut version = 1;
    let all = cases(mode);
    let pushed = ROUNDS * all.len();
    for (round, case) in (0..ROUNDS).flat_map(|r| all.iter().map(move |c| (r, c))) {
        version += 1;
        let v = format!("v{version}");
        let before = b.metrics().await?;
        let resp = (case.make)(&ctx(stream.latest_csr()), &v)
            .with_context(|| format!("building `{}`", case.kind))?;
        let nonce = resp.nonce.clone();
        let reply = push(&mut stream, resp)
            .await
            .with_context(|| format!("after `{}`", case.kind))?;
        let message = reply
            .nack_message()
            .with_context(|| format!("`{}` was ACKed, not NACKed", case.kind))?
            .to_string();
        ensure!(
            reply.nack_code() == Some(3),
            "`{}`: NACK code {:?}, want 3 (INVALID_ARGUMENT)",
            case.kind,
            reply.nack_code()
        );
        ensure!(
            reply.version() == "v1" && reply.request.response_nonce == nonce,
            "`{}`: NACK carries version {:?} nonce {:?}, want v1 and {nonce}",
            case.kind,
            reply.version(),
            reply.request.response_nonce
        );
        ensure!(
            message.contains(case.says),
            "`{}`: NACK message {message:?} should mention {:?}",
            case.kind,
            case.says
        );
        // Keeps serving on the old SVID.
        let serial = probe(&b, &ca, &prober)
            .await
            .with_context(|| format!("probe after `{}`", case.kind))?;
        ensure!(
            serial == v1_serial,
            "`{}`: B now presents {serial}, not v1's {v1_serial}",
            case.kind
        );
        // Counted under its reason, not as a success.
        let after = b.metrics().await?;
        ensure!(
            updates(&after, case.label) == updates(&before, case.label) + 1.0
                && updates(&after, "ok") == 1.0,
            "`{}`: want result={:?} +1 and ok=1:\nbefore\n{}\nafter\n{}",
            case.kind,
            case.label,
            before.lines_of("trellis_sds_updates_total"),
            after.lines_of("trellis_sds_updates_total")
        );
        ensure!(
            after.sum("trellis_sds_connected", &[]) == 1.0,
            "`{}`: trellis_sds_connected is not 1",
            case.kind
        );
        // Same stream, same process.
        ensure!(
            server.try_next_stream().is_none(),
            "`{}`: the sidecar opened a new SDS stream",
            case.kind
        );
        ensure!(
            b.child.try_exit().is_none(),
            "`{}`: sidecar B exited",
            case.kind
        );
        if round == 0 {
            rows.push(Row {
                kind: case.kind,
                label: case.label,
                message,
            });
        }
    }
    load.end(phase);

    // A good update after all that: ACKed and installed.
    version += 1;
    let v = format!("v{version}");
    let good = ctx(stream.latest_csr()).good(&v)?;
    let new_serial = serial_of_response(&good)?;
    let ack = push(&mut stream, good).await?;
    ensure!(
        ack.is_ack() && ack.version() == v,
        "final good update: version {:?}, {:?}",
        ack.version(),
        ack.request.error_detail
    );
    let serial = probe(&b, &ca, &prober).await?;
    ensure!(
        serial == new_serial && serial != v1_serial,
        "after the good update B presents {serial}, want {new_serial}"
    );
    let m = b.metrics().await?;
    ensure!(
        updates(&m, "ok") == 2.0,
        "{}",
        m.lines_of("trellis_sds_updates_total")
    );

    let report = load.stop().await;
    println!("\nscenario 7 ({mode:?} mode): malformed SDS updates → NACK, old SVID keeps serving");
    println!("| update | NACK error_detail.message | trellis_sds_updates_total{{result}} |");
    println!("|---|---|---|");
    for r in &rows {
        println!("| {} | {} | `{}` |", r.kind, r.message, r.label);
    }
    println!(
        "{pushed} hostile updates ({} kinds × {ROUNDS}): every one NACKed on the same stream, serial unchanged, probe 200",
        rows.len()
    );
    println!(
        "final good update {v}: ACKed, serial {} → {}",
        &v1_serial[..8.min(v1_serial.len())],
        &new_serial[..8.min(new_serial.len())]
    );
    println!("{}", m.lines_of("trellis_sds_updates_total"));
    report.print(&format!("malformed SDS updates ({mode:?} mode)"));
    report.assert_no_failures()?;
    drop(a);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_updates_are_nacked_in_csr_mode_and_the_old_svid_keeps_serving(
) -> anyhow::Result<()> {
    e2e(scenario(Mode::Csr)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_updates_are_nacked_in_server_key_mode_and_the_old_svid_keeps_serving(
) -> anyhow::Result<()> {
    e2e(scenario(Mode::ServerKey)).await
}
