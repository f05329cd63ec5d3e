//! The log on the admin port, as JSON (hashes and signatures in base64):
//!
//! - `GET /log/sth`: the latest signed tree head;
//! - `GET /log/key`: the log's public key (PEM), what every verifier needs;
//! - `GET /log/inclusion?serial=HEX` (or `index=N`), optional `tree_size=N` (default: the
//!   latest head's): the entry, its RFC 9162 inclusion proof, and the head it proves against;
//! - `GET /log/consistency?first=N&second=M` (`second` defaults to the latest head's size);
//! - `GET /log/entries?start=N&end=M` (end exclusive, at most 1,000 per call).

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use trellis_transparency::{LogBody, LogEntry};

use super::{IssuanceLog, LogError};

/// Most entries one `/log/entries` call returns.
pub const MAX_ENTRIES_PER_CALL: u64 = 1000;

const JSON: &str = "application/json";
const PLAIN: &str = "text/plain; charset=utf-8";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn ok(value: Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, JSON, value.to_string())
}

fn bad(status: StatusCode, why: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, PLAIN, format!("{why}\n"))
}

/// An entry for people and scripts: what it records, decoded.
pub fn entry_json(entry: &LogEntry) -> Value {
    match &entry.body {
        LogBody::Issuance(e) => json!({
            "index": entry.index,
            "time_ms": entry.time_ms,
            "kind": "issuance",
            "serial": hex::encode(&e.serial),
            "spiffe_id": e.spiffe_id,
            "public_key_sha256": hex::encode(e.public_key_sha256),
            "not_before": e.not_before,
            "not_after": e.not_after,
            "issuer_key_id": hex::encode(&e.issuer_key_id),
            "attestation": e.attestation,
        }),
        LogBody::CaPhase(e) => json!({
            "index": entry.index,
            "time_ms": entry.time_ms,
            "kind": "ca_phase",
            "ca_sha256": hex::encode(e.ca_sha256),
            "ca_key_id": hex::encode(&e.ca_key_id),
            "phase": e.phase,
        }),
    }
}

fn query_u64(query: &str, name: &str) -> Result<Option<u64>, String> {
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return value
                .parse()
                .map(Some)
                .map_err(|_| format!("`{name}` must be a whole number, got `{value}`"));
        }
    }
    Ok(None)
}

fn query_str<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// Answers `path` (under `/log/`) with `query`.
pub async fn respond(log: &Arc<IssuanceLog>, path: &str, query: &str) -> Response<Full<Bytes>> {
    let log = Arc::clone(log);
    let (path, query) = (path.to_owned(), query.to_owned());
    // Entries and serials are read from the registry: blocking calls.
    match tokio::task::spawn_blocking(move || route(&log, &path, &query)).await {
        Ok(resp) => resp,
        Err(e) => bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("log request failed: {e}"),
        ),
    }
}

fn route(log: &IssuanceLog, path: &str, query: &str) -> Response<Full<Bytes>> {
    let result = match path {
        "/log/sth" => sth(log),
        "/log/key" => return reply(StatusCode::OK, PLAIN, log.public_key().to_pem()),
        "/log/inclusion" => inclusion(log, query),
        "/log/consistency" => consistency(log, query),
        "/log/entries" => entries(log, query),
        _ => Err((
            StatusCode::NOT_FOUND,
            "not found: try GET /log/sth, /log/key, /log/inclusion?serial=HEX, \
             /log/consistency?first=N&second=M, /log/entries?start=N&end=M"
                .to_owned(),
        )),
    };
    match result {
        Ok(value) => ok(value),
        Err((status, why)) => bad(status, why),
    }
}

type Answer = Result<Value, (StatusCode, String)>;

/// The latest signed head, or the 404 a log with nothing issued answers.
fn latest(
    log: &IssuanceLog,
) -> Result<Arc<trellis_transparency::SignedTreeHead>, (StatusCode, String)> {
    log.latest_head().ok_or((
        StatusCode::NOT_FOUND,
        "the log has no signed head yet: nothing was issued".to_owned(),
    ))
}

/// A proof the log could not give: the request's fault (400), the registry away while a page
/// of older entries was read back (503), or stored entries that changed under the log (500).
fn proof_error(e: LogError) -> (StatusCode, String) {
    let status = match e {
        LogError::Tree(_) => StatusCode::BAD_REQUEST,
        LogError::Registry(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string())
}

fn head_size(log: &IssuanceLog) -> Result<u64, (StatusCode, String)> {
    Ok(latest(log)?.head.tree_size)
}

fn sth(log: &IssuanceLog) -> Answer {
    let head = latest(log)?;
    serde_json::to_value(&*head).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn inclusion(log: &IssuanceLog, query: &str) -> Answer {
    let bad_request = |e: String| (StatusCode::BAD_REQUEST, e);
    let index = match (
        query_str(query, "serial"),
        query_u64(query, "index").map_err(bad_request)?,
    ) {
        (Some(serial), None) => {
            let serial = serial.to_ascii_lowercase().replace(':', "");
            log.registry()
                .log_index_of_serial(&serial)
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
                .ok_or((
                    StatusCode::NOT_FOUND,
                    format!("no SVID with serial {serial} is in the log"),
                ))?
        }
        (None, Some(index)) => index,
        _ => {
            return Err(bad_request(
                "give exactly one of serial=HEX or index=N".to_owned(),
            ))
        }
    };
    let latest = head_size(log)?;
    let size = query_u64(query, "tree_size")
        .map_err(bad_request)?
        .unwrap_or(latest);
    if size > latest {
        return Err(bad_request(format!(
            "tree_size {size} is beyond the latest signed head ({latest})"
        )));
    }
    if index >= size {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "entry {index} is not covered by the signed head of size {size} yet; heads are \
                 signed every second or so: retry"
            ),
        ));
    }
    let proof = log.inclusion_proof(index, size).map_err(proof_error)?;
    let stored = log
        .registry()
        .log_entries(index, index + 1)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let entry = stored.into_iter().next().ok_or((
        StatusCode::NOT_FOUND,
        format!("entry {index} is missing from storage"),
    ))?;
    let decoded = LogEntry::decode(&entry.bytes).map(|e| entry_json(&e)).ok();
    let head = log.latest_head().filter(|h| h.head.tree_size == size);
    Ok(json!({
        "index": index,
        "tree_size": size,
        "leaf_hash": b64(&trellis_transparency::leaf_hash(&entry.bytes)),
        "entry": b64(&entry.bytes),
        "decoded": decoded,
        "proof": proof.iter().map(|h| b64(h)).collect::<Vec<_>>(),
        "head": head.map(|h| serde_json::to_value(&*h).unwrap_or(Value::Null)),
    }))
}

fn consistency(log: &IssuanceLog, query: &str) -> Answer {
    let bad_request = |e: String| (StatusCode::BAD_REQUEST, e);
    let first = query_u64(query, "first")
        .map_err(bad_request)?
        .ok_or_else(|| bad_request("`first` is required".to_owned()))?;
    let latest = head_size(log)?;
    let second = query_u64(query, "second")
        .map_err(bad_request)?
        .unwrap_or(latest);
    if second > latest {
        return Err(bad_request(format!(
            "second {second} is beyond the latest signed head ({latest})"
        )));
    }
    let proof = log.consistency_proof(first, second).map_err(proof_error)?;
    Ok(json!({
        "first": first,
        "second": second,
        "proof": proof.iter().map(|h| b64(h)).collect::<Vec<_>>(),
    }))
}

fn entries(log: &IssuanceLog, query: &str) -> Answer {
    let bad_request = |e: String| (StatusCode::BAD_REQUEST, e);
    let start = query_u64(query, "start").map_err(bad_request)?.unwrap_or(0);
    let size = log.size();
    let end = query_u64(query, "end")
        .map_err(bad_request)?
        .unwrap_or(size)
        .min(size)
        .min(start.saturating_add(MAX_ENTRIES_PER_CALL));
    let stored = log
        .registry()
        .log_entries(start, end)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let list: Vec<Value> = stored
        .iter()
        .map(|e| {
            json!({
                "index": e.index,
                "entry": b64(&e.bytes),
                "decoded": LogEntry::decode(&e.bytes).map(|d| entry_json(&d)).ok(),
            })
        })
        .collect();
    Ok(json!({ "start": start, "end": end, "entries": list }))
}
