//! Split join tokens (`trellis-join.<selector>.<verifier>`) through a real `trellis control`:
//! what `trellis token create` prints, and the answers a caller gets over SDS for a wrong
//! verifier, an unknown selector and a token in the old single-part format.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use base64::Engine as _;
use tonic::Code;
use trellis_tests::{e2e, fetch_svid, ControlPlane, ControlPlaneOpts, SdsStream};

/// Generous: the machine is shared and loaded.
const RECV: Duration = Duration::from_secs(30);
/// Refusals of each kind timed for the printed figure.
const ROUNDS: usize = 25;

/// Opens a stream with `credential` and returns the gRPC status it fails with.
async fn refusal(cp: &ControlPlane, credential: &str) -> anyhow::Result<tonic::Status> {
    let mut client = cp.sds_client().await?;
    let result = async {
        let mut stream = SdsStream::open(&mut client, Some(credential), &["default"]).await?;
        stream.recv(RECV).await
    }
    .await;
    match result {
        Ok(resp) => bail!(
            "want a gRPC error, got a response with {} resources",
            resp.resources.len()
        ),
        Err(e) => e
            .chain()
            .find_map(|c| c.downcast_ref::<tonic::Status>())
            .cloned()
            .with_context(|| format!("want a gRPC status, got: {e:#}")),
    }
}

/// `token` with the first character of its verifier changed.
fn with_wrong_verifier(token: &str) -> String {
    let (head, verifier) = token.rsplit_once('.').unwrap_or((token, ""));
    let first = if verifier.starts_with('A') { 'B' } else { 'A' };
    format!("{head}.{first}{}", verifier.get(1..).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_selector_and_verifier() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let token = cp.create_token("spiffe://example.org/host/shape", "1h")?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = token
            .strip_prefix("trellis-join.")
            .with_context(|| format!("no prefix: {token}"))?;
        let (selector, verifier) = body
            .split_once('.')
            .with_context(|| format!("not two parts: {token}"))?;
        ensure!(b64.decode(selector)?.len() == 16, "selector: {selector}");
        ensure!(b64.decode(verifier)?.len() == 32, "verifier length");
        ensure!(token.len() == 79, "token length {}", token.len());
        // The state database holds the selector, never the verifier.
        let db = std::fs::read(cp.state_dir.join("trellis.db"))?;
        let wal = std::fs::read(cp.state_dir.join("trellis.db-wal")).unwrap_or_default();
        let holds = |needle: &str| {
            [&db, &wal]
                .iter()
                .any(|hay| hay.windows(needle.len()).any(|w| w == needle.as_bytes()))
        };
        ensure!(!holds(verifier), "the verifier is stored in clear");
        ensure!(holds(selector), "the selector is not stored");
        Ok(())
    })
    .await
}

/// A wrong verifier for a real selector gets exactly the answer an unknown selector gets,
/// and the token still works afterwards; each refusal is counted as `join_token_unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_verifier_is_refused_like_an_unknown_token() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let token = cp.create_token("spiffe://example.org/host/split", "1h")?;
        let wrong = with_wrong_verifier(&token);
        ensure!(wrong != token && wrong.len() == token.len());
        let unknown = format!("trellis-join.{}.{}", "A".repeat(22), "A".repeat(43));

        let by_verifier = refusal(&cp, &wrong).await?;
        let by_selector = refusal(&cp, &unknown).await?;
        for (what, s) in [
            ("wrong verifier", &by_verifier),
            ("unknown selector", &by_selector),
        ] {
            ensure!(s.code() == Code::Unauthenticated, "{what}: {s:?}");
            ensure!(
                !s.message().contains(&token[13..]),
                "{what}: echoes the token"
            );
        }
        ensure!(
            by_verifier.message() == by_selector.message(),
            "different answers: {:?} vs {:?}",
            by_verifier.message(),
            by_selector.message()
        );
        // A figure, not an assertion: the median refusal time of each, interleaved. A known
        // selector costs a row read more than an unknown one; selectors are not secret.
        let (mut t_wrong, mut t_unknown) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            for (cred, times) in [(&wrong, &mut t_wrong), (&unknown, &mut t_unknown)] {
                let started = Instant::now();
                refusal(&cp, cred).await?;
                times.push(started.elapsed());
            }
        }
        t_wrong.sort();
        t_unknown.sort();
        eprintln!(
            "median refusal over {ROUNDS} streams each (connection included): wrong verifier \
             {:?}, unknown selector {:?}; both answered {:?}",
            t_wrong[ROUNDS / 2],
            t_unknown[ROUNDS / 2],
            by_verifier.message()
        );

        // Not spent by the wrong guess: the holder gets an SVID.
        let (svid, _) = fetch_svid(&cp, &token).await?;
        ensure!(svid.spiffe_id().as_str() == "spiffe://example.org/host/split");

        let metrics = cp.admin_get("/metrics").await?.text();
        let want = format!(
            "trellis_attestation_failures_total{{reason=\"join_token_unknown\"}} {}",
            2 + 2 * ROUNDS
        );
        ensure!(metrics.contains(&want), "want {want}:\n{metrics}");
        Ok(())
    })
    .await
}

/// A token in the format of earlier builds is refused before any lookup, and the message
/// tells the operator what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_format_token_is_refused_with_what_to_do() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let old = format!(
            "trellis-join.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32])
        );
        ensure!(old.len() == 56);
        let status = refusal(&cp, &old).await?;
        ensure!(status.code() == Code::Unauthenticated, "{status:?}");
        ensure!(
            status.message().contains("trellis token create"),
            "the message does not say what to do: {:?}",
            status.message()
        );
        ensure!(!status.message().contains(&old[13..]), "echoes the token");
        eprintln!("old-format token: {:?}", status.message());
        // The control plane keeps serving real tokens.
        let token = cp.create_token("spiffe://example.org/host/after", "1h")?;
        fetch_svid(&cp, &token).await?;
        Ok(())
    })
    .await
}
