//! Fills a control-plane state directory with a transparency log of N issuance entries and
//! valid signed heads, to time `trellis log verify` end to end (storage reads included).
//!
//! ```text
//! cargo run -p trellis-control --example translog_fill -- --state-dir /tmp/log1m --entries 1000000
//! /usr/bin/time -v target/release/trellis log verify --state-dir /tmp/log1m --log-key /tmp/log1m/log-key.pem
//! ```
//!
//! Everything goes through the control plane's own code, not hand-written SQL: entries are
//! appended by [`Registry::record_issuances`] (the recorder's path: issuance records and their
//! log entries in one transaction, `--batch` per transaction like the recorder's batches),
//! and heads are signed and stored by [`IssuanceLog::sync`] after every `--per-head` entries
//! (a live control plane signs one per second while the log grows). The entries look like
//! real ones (16-byte serial, `spiffe://example.org/ns/…/sa/…`, 20-byte issuer key id, a day
//! of validity); their certificates were never made, which `verify` cannot tell and need not.
//! The state directory must not hold a database yet; the log key is created in it as
//! `trellis control` does and written to `<state-dir>/log-key.pem`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use rand::RngCore as _;
use trellis_control::registry::{IssuanceRecord, Registry};
use trellis_control::translog::{IssuanceLog, LogMetrics, LOG_KEY_FILE};
use trellis_identity::SpiffeId;
use trellis_transparency::{IssuanceEntry, LogBody};

struct Args {
    state_dir: PathBuf,
    entries: u64,
    batch: u64,
    per_head: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut state_dir = None;
    let mut args = Args {
        state_dir: PathBuf::new(),
        entries: 1_000_000,
        batch: 1_000,
        per_head: 1_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .replace('_', "")
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("{flag} {value}: want a positive whole number"))
        };
        match flag.as_str() {
            "--state-dir" => state_dir = Some(PathBuf::from(&value)),
            "--entries" => args.entries = number()?,
            "--batch" => args.batch = number()?,
            "--per-head" => args.per_head = number()?,
            other => bail!(
                "unknown flag {other}; allowed: --state-dir DIR, --entries N (1000000), \
                 --batch N (1000 records per transaction), --per-head N (1000 entries per signed head)"
            ),
        }
    }
    args.state_dir = state_dir.context("pass --state-dir DIR (a new directory)")?;
    Ok(args)
}

/// An issuance record as the CA would file it for workload `n`.
fn record(n: u64, now: SystemTime) -> anyhow::Result<IssuanceRecord> {
    let mut rng = rand::rng();
    let mut serial = vec![0u8; 16];
    rng.fill_bytes(&mut serial);
    let mut public_key_sha256 = [0u8; 32];
    rng.fill_bytes(&mut public_key_sha256);
    // Ten CAs' worth of key ids: entries of one CA repeat it, as in a real log.
    let issuer_key_id = vec![(n % 10) as u8; 20];
    let spiffe_id = SpiffeId::parse(&format!(
        "spiffe://example.org/ns/team-{:03}/sa/service-{:04}",
        n % 500,
        n % 7919
    ))?;
    let issued = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let not_after = now + Duration::from_secs(86_400);
    let serial_hex = hex::encode(&serial);
    Ok(IssuanceRecord {
        log: LogBody::Issuance(IssuanceEntry {
            serial,
            spiffe_id: spiffe_id.to_string(),
            public_key_sha256,
            not_before: issued - 60,
            not_after: issued + 86_400,
            issuer_key_id,
            attestation: "k8s".into(),
        }),
        spiffe_id,
        serial_hex,
        not_after,
        attestor: "k8s",
        peer: None,
        issued_at: now,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let db = args.state_dir.join("trellis.db");
    if db.exists() {
        bail!(
            "{} exists: give a new --state-dir (the log is appended to from index 0)",
            db.display()
        );
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("--state-dir {}", args.state_dir.display()))?;
    let registry = Arc::new(Registry::open(&db)?);
    let log = IssuanceLog::open(Arc::clone(&registry), Arc::new(LogMetrics::default()))?;
    std::fs::write(args.state_dir.join(LOG_KEY_FILE), log.public_key().to_pem())?;

    let started = Instant::now();
    let mut done = 0u64;
    let mut since_head = 0u64;
    let mut batch = Vec::with_capacity(args.batch as usize);
    while done < args.entries {
        let n = args
            .batch
            .min(args.entries - done)
            .min(args.per_head - since_head);
        let now = SystemTime::now();
        batch.clear();
        for i in 0..n {
            batch.push(record(done + i, now)?);
        }
        registry.record_issuances(&batch)?;
        done += n;
        since_head += n;
        if since_head == args.per_head || done == args.entries {
            log.sync()?;
            since_head = 0;
        }
        if done.is_multiple_of(100_000) {
            eprintln!("{done} entries in {:.1?}", started.elapsed());
        }
    }
    let head = log.latest_head().context("no signed head after filling")?;
    let heads = registry.log_heads()?.len();
    println!(
        "{}: {} entries, {} signed heads, latest root {} (key id {}), in {:.1?}",
        db.display(),
        head.head.tree_size,
        heads,
        hex::encode(head.head.root_hash),
        log.public_key().key_id(),
        started.elapsed()
    );
    Ok(())
}
