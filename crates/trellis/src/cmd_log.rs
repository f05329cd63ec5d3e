//! `trellis log`: check the issuance transparency log.
//!
//! - `verify` recomputes the whole log from storage and checks every signed head;
//! - `prove` fetches and checks the inclusion proof of one SVID;
//! - `watch` follows a running control plane's log from its admin endpoint, checks each new
//!   head against the entries and the last head, and flags identities nobody expected.
//!
//! Exit status (like `trellis inspect`): 0 verified, 1 verification failed (or an unexpected
//! identity was issued), 2 bad usage or unreachable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::Value;
use trellis_control::registry::{DatabaseUrl, Registry};
use trellis_transparency::{
    audit_log, leaf_hash, verify_consistency, verify_inclusion, Hash, LogBody, LogEntry,
    LogPublicKey, MerkleTree, SignedTreeHead, StoredEntry,
};

use crate::admin_client::AdminClient;

/// Entries read per storage query or admin call.
const PAGE: u64 = 1000;

/// `trellis log …`.
#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Recompute the whole log from storage and check every signed head; names the first bad
    /// entry (exit 0 verified, 1 failed, 2 bad usage).
    Verify(VerifyArgs),
    /// Print and check the inclusion proof of the SVID with this serial (exit 0 proven, 1
    /// refused, 2 bad usage).
    Prove(ProveArgs),
    /// Follow a control plane's log: check every new head and flag identities outside the
    /// expected patterns (exit 1 on the first failure or unexpected identity).
    Watch(WatchArgs),
}

/// Where the log is stored (offline).
#[derive(Args, Debug)]
pub struct StorageArgs {
    /// The control plane's state directory (its SQLite database).
    #[arg(long, value_name = "DIR", conflicts_with = "database")]
    state_dir: Option<PathBuf>,
    /// The control plane's database URL (PostgreSQL shared by replicas, or sqlite://PATH).
    #[arg(long, env = "TRELLIS_DATABASE", value_name = "URL")]
    database: Option<DatabaseUrl>,
}

/// The log key to verify with.
#[derive(Args, Debug)]
pub struct KeyArgs {
    /// The log's public key (PEM, as served at /log/key): pin it, so that whoever controls
    /// the control plane cannot swap it. Without it, the key comes from the same source as
    /// the log (database or admin endpoint) and is printed for you to compare.
    #[arg(long, value_name = "FILE")]
    log_key: Option<PathBuf>,
}

/// `trellis log verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    key: KeyArgs,
}

/// `trellis log prove`.
#[derive(Args, Debug)]
pub struct ProveArgs {
    /// The SVID's serial number, hex (colons allowed).
    #[arg(long, value_name = "HEX")]
    serial: String,
    /// A running control plane's admin endpoint (HOST:PORT).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["state_dir", "database"])]
    admin: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    key: KeyArgs,
    /// Give up on each admin request after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `trellis log watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The control plane's admin endpoint (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    admin: String,
    /// SPIFFE ID patterns the CA is expected to issue (`*` one path segment, a trailing
    /// `**` any rest, as in policies); any other issued ID is reported and fails the watch.
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    expect: Vec<String>,
    /// How often to ask for a new head.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after checking the current head once (for scripts and tests).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    key: KeyArgs,
    /// Give up on each admin request after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Why a command stopped: bad usage (2) or a failed verification (1).
enum Stop {
    Usage(anyhow::Error),
    Failed(String),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Usage(e)
    }
}

/// Runs `trellis log …` with its own exit codes.
pub fn run(cmd: LogCommand) -> ExitCode {
    let result = match cmd {
        LogCommand::Verify(args) => verify(args),
        LogCommand::Prove(args) => prove(args),
        LogCommand::Watch(args) => watch(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Failed(why)) => {
            eprintln!("verification failed: {why}");
            ExitCode::FAILURE
        }
        Err(Stop::Usage(err)) => {
            eprintln!("error: {}", crate::logging::describe(&err));
            ExitCode::from(2)
        }
    }
}

fn open(storage: &StorageArgs) -> anyhow::Result<Registry> {
    crate::cmd_token::open_registry(storage.state_dir.as_ref(), storage.database.as_ref())
}

/// The pinned key, or the one from the log's own source (printed, so it can be compared
/// with a copy pinned elsewhere).
fn key_from(
    args: &KeyArgs,
    from_source: impl FnOnce() -> anyhow::Result<LogPublicKey>,
) -> anyhow::Result<LogPublicKey> {
    if let Some(path) = &args.log_key {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("--log-key {}", path.display()))?;
        return LogPublicKey::from_pem(&pem)
            .with_context(|| format!("--log-key {}", path.display()));
    }
    let key = from_source()?;
    eprintln!(
        "note: using the log key from the log's own source (key id {}); pin it with --log-key",
        key.key_id()
    );
    Ok(key)
}

fn stored_key(registry: &Registry) -> anyhow::Result<LogPublicKey> {
    let pkcs8 = registry.log_key()?.context(
        "the database has no transparency-log key: the control plane never opened its log here",
    )?;
    Ok(trellis_control::translog::public_key_of(&pkcs8)?)
}

/// Every stored entry, page by page (a million entries need not sit in memory twice).
struct StoredEntries<'a> {
    registry: &'a Registry,
    next: u64,
    page: std::vec::IntoIter<StoredEntry>,
    error: Option<anyhow::Error>,
    done: bool,
}

impl Iterator for StoredEntries<'_> {
    type Item = StoredEntry;

    fn next(&mut self) -> Option<StoredEntry> {
        if let Some(e) = self.page.next() {
            return Some(e);
        }
        if self.done {
            return None;
        }
        match self.registry.log_entries(self.next, self.next + PAGE * 100) {
            Ok(page) => {
                self.done = (page.len() as u64) < PAGE * 100;
                // Continue after the last stored index: a gap is the audit's to report.
                if let Some(last) = page.last() {
                    self.next = last.index + 1;
                }
                self.page = page.into_iter();
                self.page.next()
            }
            Err(e) => {
                self.error = Some(e.into());
                self.done = true;
                None
            }
        }
    }
}

fn verify(args: VerifyArgs) -> Result<(), Stop> {
    let registry = open(&args.storage)?;
    let key = key_from(&args.key, || stored_key(&registry))?;
    let heads = registry.log_heads().map_err(anyhow::Error::from)?;
    let mut entries = StoredEntries {
        registry: &registry,
        next: 0,
        page: Vec::new().into_iter(),
        error: None,
        done: false,
    };
    let result = audit_log(&mut entries, &heads, &key);
    if let Some(e) = entries.error {
        return Err(Stop::Usage(e.context("cannot read the log")));
    }
    let summary = result.map_err(|e| Stop::Failed(e.to_string()))?;
    println!(
        "verified: {} entries, {} signed heads; root {} (key id {})",
        summary.entries,
        summary.heads,
        hex::encode(summary.root),
        key.key_id()
    );
    Ok(())
}

fn b64(value: &Value, what: &str) -> anyhow::Result<Vec<u8>> {
    let text = value
        .as_str()
        .with_context(|| format!("the answer has no `{what}`"))?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .with_context(|| format!("`{what}` is not base64"))
}

fn hash(value: &Value, what: &str) -> anyhow::Result<Hash> {
    b64(value, what)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("`{what}` is not a 32-byte hash"))
}

fn hashes(value: &Value, what: &str) -> anyhow::Result<Vec<Hash>> {
    value
        .as_array()
        .with_context(|| format!("the answer has no `{what}` list"))?
        .iter()
        .map(|h| hash(h, what))
        .collect()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn get_json(client: &AdminClient, path: &str) -> anyhow::Result<Value> {
    let resp = client.get(path).await?;
    if resp.status != 200 {
        bail!(
            "GET {}{path}: {} {}",
            client.url(),
            resp.status,
            resp.body.trim()
        );
    }
    serde_json::from_str(&resp.body)
        .with_context(|| format!("GET {}{path}: not JSON", client.url()))
}

async fn admin_key(client: &AdminClient, args: &KeyArgs) -> anyhow::Result<LogPublicKey> {
    let fetched = if args.log_key.is_none() {
        let resp = client.get("/log/key").await?;
        if resp.status != 200 {
            bail!(
                "GET {}/log/key: {} {}",
                client.url(),
                resp.status,
                resp.body.trim()
            );
        }
        Some(LogPublicKey::from_pem(&resp.body).context("/log/key")?)
    } else {
        None
    };
    key_from(args, || fetched.context("no log key"))
}

fn describe_entry(bytes: &[u8]) -> String {
    match LogEntry::decode(bytes) {
        Ok(e) => match &e.body {
            LogBody::Issuance(i) => format!(
                "entry {}: {} serial {} ({}), valid {}..{}",
                e.index,
                i.spiffe_id,
                hex::encode(&i.serial),
                i.attestation,
                i.not_before,
                i.not_after
            ),
            LogBody::CaPhase(p) => format!(
                "entry {}: CA {} entered phase {}",
                e.index,
                hex::encode(&p.ca_key_id),
                p.phase
            ),
        },
        Err(err) => format!("an entry this build cannot read: {err}"),
    }
}

fn prove(args: ProveArgs) -> Result<(), Stop> {
    let serial = args.serial.to_ascii_lowercase().replace(':', "");
    if serial.is_empty() || hex::decode(&serial).is_err() {
        return Err(Stop::Usage(anyhow::anyhow!(
            "--serial `{}` is not hex",
            args.serial
        )));
    }
    let (key, index, size, entry, proof, head) = match &args.admin {
        Some(admin) => {
            let client = AdminClient::parse(admin, args.timeout)?;
            let rt = runtime()?;
            rt.block_on(async {
                let key = admin_key(&client, &args.key).await?;
                let v = get_json(&client, &format!("/log/inclusion?serial={serial}")).await?;
                let head: SignedTreeHead = serde_json::from_value(v["head"].clone())
                    .context("the answer has no signed head")?;
                anyhow::Ok((
                    key,
                    v["index"].as_u64().context("no index")?,
                    v["tree_size"].as_u64().context("no tree_size")?,
                    b64(&v["entry"], "entry")?,
                    hashes(&v["proof"], "proof")?,
                    head,
                ))
            })?
        }
        None => {
            let registry = open(&args.storage)?;
            let key = key_from(&args.key, || stored_key(&registry))?;
            let index = registry
                .log_index_of_serial(&serial)
                .map_err(anyhow::Error::from)?
                .ok_or_else(|| {
                    Stop::Failed(format!("no SVID with serial {serial} is in the log"))
                })?;
            let head = registry
                .latest_log_head()
                .map_err(anyhow::Error::from)?
                .ok_or_else(|| Stop::Failed("the log has no signed head yet".into()))?;
            let size = head.head.tree_size;
            if index >= size {
                return Err(Stop::Failed(format!(
                    "entry {index} is not covered by the latest signed head (size {size}) yet; retry in a second"
                )));
            }
            let leaves = registry
                .log_leaf_hashes(0, size)
                .map_err(anyhow::Error::from)?;
            let tree = MerkleTree::from_leaf_hashes(leaves);
            let proof = tree
                .inclusion_proof(index, size)
                .map_err(|e| Stop::Failed(e.to_string()))?;
            let entry = registry
                .log_entries(index, index + 1)
                .map_err(anyhow::Error::from)?
                .pop()
                .ok_or_else(|| Stop::Failed(format!("entry {index} is missing")))?;
            (key, index, size, entry.bytes, proof, head)
        }
    };
    key.verify(&head)
        .map_err(|e| Stop::Failed(format!("head for size {}: {e}", head.head.tree_size)))?;
    if head.head.tree_size != size {
        return Err(Stop::Failed(format!(
            "the proof is for size {size} but the head is for size {}",
            head.head.tree_size
        )));
    }
    let decoded =
        LogEntry::decode(&entry).map_err(|e| Stop::Failed(format!("entry {index}: {e}")))?;
    match &decoded.body {
        LogBody::Issuance(i) if same_serial(&hex::encode(&i.serial), &serial) => {}
        _ => {
            return Err(Stop::Failed(format!(
                "entry {index} is not the SVID with serial {serial}: {}",
                describe_entry(&entry)
            )))
        }
    }
    if decoded.index != index {
        return Err(Stop::Failed(format!(
            "entry {index} records index {}",
            decoded.index
        )));
    }
    verify_inclusion(
        index,
        size,
        &leaf_hash(&entry),
        &proof,
        &head.head.root_hash,
    )
    .map_err(|e| Stop::Failed(format!("entry {index} in the tree of {size}: {e}")))?;
    println!("{}", describe_entry(&entry));
    println!(
        "proven: included in the signed head of size {size} (root {}, signed at {} ms, key id {})",
        hex::encode(head.head.root_hash),
        head.head.timestamp_ms,
        key.key_id()
    );
    for (i, h) in proof.iter().enumerate() {
        println!("  proof[{i}] {}", hex::encode(h));
    }
    Ok(())
}

/// Serials compare as numbers: DER may pad a leading zero byte that displays drop.
fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0') == b.trim_start_matches('0')
}

/// `spiffe://td/a/*` (one segment), `spiffe://td/a/**` (any rest), or exact.
fn id_matches(pattern: &str, id: &str) -> bool {
    let mut p = pattern.split('/');
    let mut s = id.split('/');
    loop {
        match (p.next(), s.next()) {
            (Some("**"), Some(_)) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn watch(args: WatchArgs) -> Result<(), Stop> {
    for p in &args.expect {
        if !p.starts_with("spiffe://") {
            return Err(Stop::Usage(anyhow::anyhow!(
                "--expect `{p}` is not a SPIFFE ID pattern (spiffe://TRUST-DOMAIN/path, `*` for one segment, trailing `**`)"
            )));
        }
    }
    let client = AdminClient::parse(&args.admin, args.timeout)?;
    let rt = runtime()?;
    rt.block_on(async {
        let key = admin_key(&client, &args.key).await?;
        let mut tree = MerkleTree::new();
        let mut last: Option<SignedTreeHead> = None;
        // In follow mode an unreachable or failing control plane (a restart, an upgrade) is
        // waited out, not fatal: a monitor that died with it would miss the rollback a
        // restored backup brings. What it saw before stays the reference.
        let mut unavailable: Option<String> = None;
        loop {
            match poll_head(&client, &key, &mut tree, &mut last, &args.expect).await {
                Ok(()) => {
                    if unavailable.take().is_some() {
                        eprintln!("note: {} answers again", client.url());
                    }
                }
                Err(Stop::Usage(e)) if !args.once => {
                    let why = crate::logging::describe(&e);
                    if unavailable.as_ref() != Some(&why) {
                        eprintln!(
                            "note: {why}; retrying every {}",
                            humantime::format_duration(args.interval)
                        );
                        unavailable = Some(why);
                    }
                }
                Err(e) => return Err(e),
            }
            if args.once {
                return Ok(());
            }
            tokio::time::sleep(args.interval).await;
        }
    })
}

/// Fetches the latest head and, if it is new, checks it and the entries under it.
async fn poll_head(
    client: &AdminClient,
    key: &LogPublicKey,
    tree: &mut MerkleTree,
    last: &mut Option<SignedTreeHead>,
    expect: &[String],
) -> Result<(), Stop> {
    let resp = client.get("/log/sth").await?;
    if resp.status == 404 {
        // Nothing issued yet.
        return Ok(());
    }
    if resp.status != 200 {
        return Err(Stop::Usage(anyhow::anyhow!(
            "GET {}/log/sth: {} {}",
            client.url(),
            resp.status,
            resp.body.trim()
        )));
    }
    let sth: SignedTreeHead = serde_json::from_str(&resp.body)
        .map_err(|e| Stop::Failed(format!("/log/sth is not a signed head: {e}")))?;
    key.verify(&sth)
        .map_err(|e| Stop::Failed(format!("head for size {}: {e}", sth.head.tree_size)))?;
    check_new_head(client, tree, last.as_ref(), &sth, expect).await?;
    *last = Some(sth);
    Ok(())
}

async fn check_new_head(
    client: &AdminClient,
    tree: &mut MerkleTree,
    last: Option<&SignedTreeHead>,
    sth: &SignedTreeHead,
    expect: &[String],
) -> Result<(), Stop> {
    let size = sth.head.tree_size;
    if let Some(prev) = last {
        let first = prev.head.tree_size;
        if size < first {
            return Err(Stop::Failed(format!(
                "the log rolled back: head for size {size} after one for size {first}"
            )));
        }
        if size == first {
            if sth.head.root_hash != prev.head.root_hash {
                return Err(Stop::Failed(format!(
                    "two signed heads for size {size} with different roots: the log forked"
                )));
            }
            return Ok(());
        }
        let v = get_json(
            client,
            &format!("/log/consistency?first={first}&second={size}"),
        )
        .await?;
        let proof = hashes(&v["proof"], "proof")?;
        verify_consistency(
            first,
            size,
            &prev.head.root_hash,
            &sth.head.root_hash,
            &proof,
        )
        .map_err(|e| Stop::Failed(format!("heads {first} → {size} are not consistent: {e}")))?;
    }
    // Fetch every entry the watcher has not seen and recompute the root from them.
    while tree.size() < size {
        let start = tree.size();
        let end = (start + PAGE).min(size);
        let v = get_json(client, &format!("/log/entries?start={start}&end={end}")).await?;
        let list = v["entries"].as_array().context("no entries list")?;
        if list.is_empty() {
            return Err(Stop::Failed(format!("entries {start}..{end} are missing")));
        }
        for item in list {
            let bytes = b64(&item["entry"], "entry")?;
            let index = tree.size();
            let entry = LogEntry::decode(&bytes)
                .map_err(|e| Stop::Failed(format!("entry {index}: {e}")))?;
            if entry.index != index {
                return Err(Stop::Failed(format!(
                    "entry {index}: records index {}",
                    entry.index
                )));
            }
            tree.push(leaf_hash(&bytes));
            println!("{}", describe_entry(&bytes));
            if let LogBody::Issuance(i) = &entry.body {
                if !expect.is_empty() && !expect.iter().any(|p| id_matches(p, &i.spiffe_id)) {
                    return Err(Stop::Failed(format!(
                        "entry {index}: {} was issued (serial {}), which no --expect pattern allows",
                        i.spiffe_id,
                        hex::encode(&i.serial)
                    )));
                }
            }
        }
    }
    let root = tree
        .root_at(size)
        .map_err(|e| Stop::Failed(e.to_string()))?;
    if root != sth.head.root_hash {
        return Err(Stop::Failed(format!(
            "the entries served do not produce the signed root of size {size}"
        )));
    }
    // Say what this head was checked against, so a log of the watch shows each link.
    let against = match last {
        Some(prev) => format!("consistent with head {}", prev.head.tree_size),
        None => "the first this watch has seen".to_owned(),
    };
    println!(
        "head {size} verified (root {}), {against}",
        hex::encode(root)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::id_matches;

    #[test]
    fn patterns_match_like_policy_principals() {
        let id = "spiffe://example.org/ns/prod/sa/web";
        assert!(id_matches(id, id));
        assert!(id_matches("spiffe://example.org/ns/*/sa/*", id));
        assert!(id_matches("spiffe://example.org/ns/**", id));
        assert!(!id_matches("spiffe://example.org/ns/*", id));
        assert!(!id_matches("spiffe://example.org/ns/dev/**", id));
        assert!(!id_matches("spiffe://other.org/**", id));
    }
}
