//! SDS load: N concurrent StreamSecrets streams against one `trellis control` process.
//!
//! Reports the time until every stream holds its first SVID, how the next rotation wave
//! reaches all of them, and the control plane's RSS and CPU time.
//!
//! ```text
//! cargo build --release -p trellis
//! cargo run --release -p trellis-control --example sds_load -- --streams 10000
//! # 100,000 sidecars, one connection each, from 8 loopback source addresses:
//! ulimit -n 250000
//! target/release/examples/sds_load --streams 100000 --per-connection 1 --sources 8 --rotate-every 5m
//! ```
//!
//! Connections come from `--sources` loopback addresses (127.1.0.1, 127.1.0.2, …; one address
//! has ~28,000 ephemeral ports towards one server port), each address with its own join token
//! (a token's extra streams must come from the IP that redeemed it, within 30 s). Streams open
//! address by address, at most `--groups-in-flight` addresses at a time, so each address's
//! streams all arrive inside that window however long the whole fleet takes. Above 20,000
//! connections the control plane is started with `--sds-max-connections` to match.
//!
//! With `--database postgres://…` the control plane it starts is one replica on that shared
//! database (its tokens are created there too), and `--first-source` moves this process's
//! source addresses past another's: `tests/bench/scale_replicas.sh` runs one `sds_load` per
//! replica and adds up their `fleet:` lines, when one process may not hold every connection.
//!
//! Each connection PINGs every `--ping` (20 s), as a Trellis sidecar's SDS client does;
//! `--ping 0s` sends none, as a stock Envoy without `connection_keepalive`.
//! `--idle-before-streams D` holds the connections open and quiet before any stream, and
//! `SDS_LOAD_CONTROL_LOG` sets the control plane's `RUST_LOG` (`warn` by default).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use trellis_control::registry::{Database, Registry};
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};
use trellis_proto::{DiscoveryRequest, SecretDiscoveryServiceClient, SECRET_TYPE_URL};

struct Args {
    streams: usize,
    per_connection: usize,
    rotate_every: Duration,
    sources: usize,
    groups_in_flight: usize,
    bin: PathBuf,
    database: Option<String>,
    first_source: usize,
    idle_before_streams: Duration,
    ping: Duration,
}

const USAGE: &str = "[--streams N] [--per-connection N] [--rotate-every D] [--sources N] \
                     [--groups-in-flight N] [--trellis-bin PATH] [--database URL] \
                     [--first-source N] [--idle-before-streams D] [--ping D]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        streams: 1000,
        per_connection: 100,
        rotate_every: Duration::from_secs(20),
        sources: 0,
        groups_in_flight: 4,
        bin: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/trellis"),
        database: None,
        first_source: 0,
        idle_before_streams: Duration::ZERO,
        ping: Duration::from_secs(20),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("usage: sds_load {USAGE}");
            std::process::exit(0);
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--streams" => args.streams = value.parse()?,
            "--per-connection" => args.per_connection = value.parse()?,
            "--rotate-every" => args.rotate_every = humantime::parse_duration(&value)?,
            "--sources" => args.sources = value.parse()?,
            "--groups-in-flight" => args.groups_in_flight = value.parse()?,
            "--trellis-bin" => args.bin = value.into(),
            "--database" => args.database = Some(value),
            "--first-source" => args.first_source = value.parse()?,
            "--ping" => args.ping = humantime::parse_duration(&value)?,
            "--idle-before-streams" => {
                args.idle_before_streams = humantime::parse_duration(&value)?
            }
            _ => bail!("unknown flag {flag}: use {USAGE}"),
        }
    }
    if args.per_connection == 0 || args.streams == 0 || args.groups_in_flight == 0 {
        bail!("--streams, --per-connection and --groups-in-flight must be at least 1");
    }
    // One source address per 20,000 connections unless told otherwise.
    let connections = args.streams.div_ceil(args.per_connection);
    if args.sources == 0 {
        args.sources = connections.div_ceil(20_000);
    }
    if args
        .first_source
        .checked_add(args.sources)
        .is_none_or(|end| end > 254 * 254)
    {
        bail!("--first-source + --sources: at most {}", 254 * 254);
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

/// Now as Unix seconds: several `sds_load` processes' events on one clock.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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

/// The `i`th load source address: 127.1.0.1, 127.1.0.2, … (all of 127.0.0.0/8 is loopback).
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 254) as u8, (i % 254 + 1) as u8))
}

/// Opens `connections` channels round-robin over the source addresses, `parallel` at a time.
async fn connect_all(
    sds: std::net::SocketAddr,
    bundle: &TrustBundle,
    control_id: &SpiffeId,
    connections: usize,
    sources: std::ops::Range<usize>,
    parallel: usize,
    ping: Option<(Duration, Duration)>,
) -> anyhow::Result<Vec<Channel>> {
    let mut opened: Vec<Option<Channel>> = vec![None; connections];
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < connections || !pending.is_empty() {
        while next < connections && pending.len() < parallel {
            let (bundle, control_id, i) = (bundle.clone(), control_id.clone(), next);
            let from = source(sources.start + i % sources.len());
            pending.spawn(async move {
                let channel = trellis_control::client::connect_from(
                    sds,
                    Some(from),
                    bundle,
                    control_id,
                    None,
                    ping,
                )
                .await;
                (i, channel)
            });
            next += 1;
        }
        if let Some(done) = pending.join_next().await {
            let (i, channel) = done?;
            opened[i] = Some(channel.with_context(|| format!("connection {i}"))?);
        }
    }
    Ok(opened.into_iter().flatten().collect())
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
    let connections = args.streams.div_ceil(args.per_connection);
    let state = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(&args.bin);
    command
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
        .arg(state.path());
    if let Some(url) = &args.database {
        command.arg("--database").arg(url);
    }
    if connections > 20_000 {
        // The default cap (20,000) protects a real control plane; this one is here to be loaded.
        command
            .arg("--sds-max-connections")
            .arg((connections + 1_000).to_string());
    }
    let mut child = command
        // SDS_LOAD_CONTROL_LOG: the control plane's RUST_LOG, e.g. to see why connections end.
        .env(
            "RUST_LOG",
            std::env::var("SDS_LOAD_CONTROL_LOG").unwrap_or_else(|_| "warn".into()),
        )
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
    let id = SpiffeId::parse("spiffe://example.org/load/worker")?;
    // One join token per source address: streams opened from the address that redeemed a
    // token, inside the redemption window, share it. The PostgreSQL client blocks on a
    // runtime of its own, so the tokens are made off this one.
    let db = match &args.database {
        Some(url) => Database::parse(url)?,
        None => Database::Sqlite(state.path().join("trellis.db")),
    };
    let (sources, token_id) = (args.sources, id.clone());
    let tokens = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let registry = Registry::connect(&db)?;
        (0..sources)
            .map(|_| {
                let token = registry.create_join_token(
                    &token_id,
                    Duration::from_secs(3600),
                    SystemTime::now(),
                )?;
                Ok(token.as_str().to_owned())
            })
            .collect()
    })
    .await??;
    let mut auths = Vec::with_capacity(args.sources);
    for token in &tokens {
        let mut auth: MetadataValue<_> = format!("Bearer {token}").parse()?;
        // As the sidecar sends it: never indexed by HPACK, so the control plane's header table
        // does not keep it (the sidecar marks it so it cannot leak through compression).
        auth.set_sensitive(true);
        auths.push(auth);
    }
    let control_id = SpiffeId::parse("spiffe://example.org/trellis/control")?;

    let (rss0, cpu0) = proc_stats(pid);
    println!("control plane pid {pid}: idle RSS {} MiB", rss0 / 1024);
    let connecting = Instant::now();
    let connecting_at = unix_now();
    let sources = args.first_source..args.first_source + args.sources;
    // PINGs as a Trellis sidecar sends them (`trellis_sidecar::sds::connect::KEEPALIVE`, every
    // 20 s, 10 s to answer); `--ping 0s` sends none, as a stock Envoy without
    // `connection_keepalive`, and leaves finding a quiet peer to the control plane's kernel.
    let ping = (!args.ping.is_zero()).then_some((args.ping, Duration::from_secs(10)));
    let channels = connect_all(sds, &bundle, &control_id, connections, sources, 64, ping).await?;
    let (rss_c, cpu_c) = proc_stats(pid);
    println!(
        "{connections} TLS connections from {} source addresses in {:.2?}: control plane RSS {} MiB ({:.1} KiB per connection), CPU {:.2} s",
        args.sources,
        connecting.elapsed(),
        rss_c / 1024,
        (rss_c.saturating_sub(rss0)) as f64 / connections as f64,
        cpu_c - cpu0
    );

    // Connections that wait before their stream, as a fleet's do while the rest connect.
    tokio::time::sleep(args.idle_before_streams).await;
    let start = Instant::now();
    let start_at = unix_now();
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<(usize, Duration)>();
    let (rot_tx, mut rot_rx) = mpsc::unbounded_channel::<Duration>();
    let (err_tx, mut err_rx) = mpsc::unbounded_channel::<String>();
    // Streams by source address (stream i uses connection i % connections, whose source is
    // (i % connections) % sources): all of one address's streams open together.
    let mut by_source: Vec<Vec<usize>> = vec![Vec::new(); args.sources];
    for i in 0..args.streams {
        by_source[(i % connections) % args.sources].push(i);
    }
    let open_group = |group: usize| {
        for &i in &by_source[group] {
            let mut client = SecretDiscoveryServiceClient::new(channels[i % connections].clone());
            let (first_tx, rot_tx, err_tx, auth) = (
                first_tx.clone(),
                rot_tx.clone(),
                err_tx.clone(),
                auths[group].clone(),
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
                                let _ = first_tx.send((group, at));
                            } else if n == 1 {
                                let _ = rot_tx.send(at);
                            }
                            n += 1;
                        }
                        Ok(None) => return drop(err_tx.send("the stream ended".into())),
                        Err(e) => return drop(err_tx.send(e.to_string())),
                    }
                }
            });
        }
    };
    let mut left_in_group: Vec<usize> = by_source.iter().map(Vec::len).collect();
    let mut next_group = 0;
    let mut in_flight = 0;
    while next_group < args.sources && in_flight < args.groups_in_flight {
        open_group(next_group);
        next_group += 1;
        in_flight += 1;
    }
    let mut firsts = Vec::with_capacity(args.streams);
    while firsts.len() < args.streams {
        tokio::select! {
            Some((group, t)) = first_rx.recv() => {
                firsts.push(t);
                left_in_group[group] -= 1;
                if left_in_group[group] == 0 && next_group < args.sources {
                    open_group(next_group);
                    next_group += 1;
                }
            }
            Some(e) = err_rx.recv() => bail!("stream failed: {e}"),
        }
    }
    drop((first_tx, rot_tx, err_tx));
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
        "  control plane RSS {} MiB ({:.1} KiB per connection above idle), CPU {:.2} s",
        rss1 / 1024,
        (rss1.saturating_sub(rss0)) as f64 / connections as f64,
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
        "  control plane RSS {} MiB ({:.1} KiB per connection above idle), CPU {:.2} s for the wave",
        rss2 / 1024,
        rss2.saturating_sub(rss0) as f64 / connections as f64,
        cpu2 - cpu1
    );
    // One line for tests/bench/scale_replicas.sh, which adds up several replicas: times as
    // Unix seconds, RSS in KiB, CPU in seconds.
    let at = |d: Duration| start_at + d.as_secs_f64();
    println!(
        "fleet: connections={connections} streams={} connecting_at={connecting_at:.3} \
         start_at={start_at:.3} served_at={:.3} wave_first_at={:.3} wave_last_at={:.3} \
         rss_idle_kib={rss0} rss_connected_kib={rss_c} rss_served_kib={rss1} \
         rss_wave_kib={rss2} cpu_connect_s={:.2} cpu_serve_s={:.2} cpu_wave_s={:.2}",
        args.streams,
        at(served),
        at(wave_start),
        at(wave_end),
        cpu_c - cpu0,
        cpu1 - cpu_c,
        cpu2 - cpu1
    );
    // A clean stop, so a profiler wrapped around the control plane (tests/bench/code-order.sh
    // runs it under callgrind) writes its profile; killed if it takes too long.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(())
}
