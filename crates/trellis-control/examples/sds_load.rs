//! SDS load: N concurrent StreamSecrets streams against one `trellis control` process.
//!
//! Reports the time until every stream holds its first SVID, how the next rotation wave
//! reaches all of them, and the control plane's RSS and CPU time.
//!
//! ```text
//! cargo build --release -p trellis
//! cargo run --release -p trellis-control --example sds_load -- --streams 10000
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use trellis_control::registry::Registry;
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};
use trellis_proto::{DiscoveryRequest, SecretDiscoveryServiceClient, SECRET_TYPE_URL};

struct Args {
    streams: usize,
    per_connection: usize,
    rotate_every: Duration,
    bin: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        streams: 1000,
        per_connection: 100,
        rotate_every: Duration::from_secs(20),
        bin: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/trellis"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--streams" => args.streams = value.parse()?,
            "--per-connection" => args.per_connection = value.parse()?,
            "--rotate-every" => args.rotate_every = humantime::parse_duration(&value)?,
            "--trellis-bin" => args.bin = value.into(),
            _ => bail!("unknown flag {flag}: use --streams N --per-connection N --rotate-every D --trellis-bin PATH"),
        }
    }
    Ok(args)
}

fn proc_stats(pid: u32) -> (u64, f64) {
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    // utime + stime are fields 14 and 15 of /proc/pid/stat, in clock ticks (100 Hz on Linux).
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(
                (after.get(11)?.parse::<f64>().ok()? + after.get(12)?.parse::<f64>().ok()?) / 100.0,
            )
        })
        .unwrap_or(0.0);
    (rss_kib, cpu)
}

fn request(version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if !args.bin.exists() {
        bail!(
            "{}: build it first with `cargo build --release -p trellis`, or pass --trellis-bin",
            args.bin.display()
        );
    }
    let state = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(&args.bin)
        .args([
            "control",
            "--trust-domain",
            "example.org",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--svid-ttl",
            "1h",
        ])
        .arg("--rotate-every")
        .arg(humantime::format_duration(args.rotate_every).to_string())
        .arg("--state-dir")
        .arg(state.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("control plane exited")?;
    let sds: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sds="))
        .context("no sds= in the listening line")?
        .parse()?;
    let td = TrustDomain::parse("example.org")?;
    let bundle =
        TrustBundle::from_pem(td.clone(), &std::fs::read(state.path().join("bundle.pem"))?)?;
    let registry = Registry::open(&state.path().join("trellis.db"))?;
    let id = SpiffeId::parse("spiffe://example.org/load/worker")?;
    // One join token: streams opened from this address inside the redemption window share it.
    let token = registry.create_join_token(&id, Duration::from_secs(600), SystemTime::now())?;
    let auth: MetadataValue<_> = format!("Bearer {}", token.as_str()).parse()?;
    let control_id = SpiffeId::parse("spiffe://example.org/trellis/control")?;

    let (rss0, cpu0) = proc_stats(pid);
    println!("control plane pid {pid}: idle RSS {} MiB", rss0 / 1024);
    let connections = args.streams.div_ceil(args.per_connection);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            trellis_control::client::connect(sds, bundle.clone(), control_id.clone(), None).await?,
        );
    }

    let start = Instant::now();
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<Duration>();
    let (rot_tx, mut rot_rx) = mpsc::unbounded_channel::<Duration>();
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    for i in 0..args.streams {
        let mut client = SecretDiscoveryServiceClient::new(channels[i % connections].clone());
        let (first_tx, rot_tx, err_tx, auth) = (
            first_tx.clone(),
            rot_tx.clone(),
            err_tx.clone(),
            auth.clone(),
        );
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(2);
            let _ = tx.send(request("", "")).await;
            let mut req = tonic::Request::new(ReceiverStream::new(rx));
            req.metadata_mut().insert("authorization", auth);
            let mut stream = match client.stream_secrets(req).await {
                Ok(s) => s.into_inner(),
                Err(e) => return drop(err_tx.send(e.to_string())),
            };
            let mut n = 0;
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        let _ = tx.send(request(&resp.version_info, &resp.nonce)).await;
                        let at = start.elapsed();
                        if n == 0 {
                            let _ = first_tx.send(at);
                        } else if n == 1 {
                            let _ = rot_tx.send(at);
                        }
                        n += 1;
                    }
                    Ok(None) => return,
                    Err(e) => return drop(err_tx.send(e.to_string())),
                }
            }
        });
    }
    drop((first_tx, rot_tx, err_tx));
    let arc_n = Arc::new(args.streams);
    let mut firsts = Vec::with_capacity(*arc_n);
    while firsts.len() < args.streams {
        tokio::select! {
            Some(t) = first_rx.recv() => firsts.push(t),
            Some(e) = err_rx.recv() => bail!("stream failed: {e}"),
        }
    }
    let served = firsts.iter().max().copied().unwrap_or_default();
    let (rss1, cpu1) = proc_stats(pid);
    println!(
        "{} streams over {} connections: all served their first SVID in {:.2?} ({:.0} SVIDs/s)",
        args.streams,
        connections,
        served,
        args.streams as f64 / served.as_secs_f64()
    );
    println!(
        "  control plane RSS {} MiB, CPU {:.2} s",
        rss1 / 1024,
        cpu1 - cpu0
    );

    let mut rots = Vec::with_capacity(args.streams);
    let deadline = tokio::time::sleep(args.rotate_every * 3 + Duration::from_secs(60));
    tokio::pin!(deadline);
    while rots.len() < args.streams {
        tokio::select! {
            Some(t) = rot_rx.recv() => rots.push(t),
            Some(e) = err_rx.recv() => bail!("stream failed: {e}"),
            () = &mut deadline => bail!("only {} of {} streams rotated in time", rots.len(), args.streams),
        }
    }
    rots.sort();
    let (rss2, cpu2) = proc_stats(pid);
    let wave_start = rots[0];
    let wave_end = rots[rots.len() - 1];
    println!(
        "rotation wave: first push {:.2?} after start, last {:.2?}; all {} streams rotated within {:.2?} (jitter window is 10% of {})",
        wave_start, wave_end, args.streams, wave_end - wave_start, humantime::format_duration(args.rotate_every)
    );
    println!(
        "  control plane RSS {} MiB, CPU {:.2} s for the wave",
        rss2 / 1024,
        cpu2 - cpu1
    );
    let _ = child.kill().await;
    Ok(())
}
