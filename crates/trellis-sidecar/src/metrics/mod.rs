//! Sidecar metrics, Prometheus text on the admin port.
//!
//! One file on purpose: every series is named, recorded and encoded here (the fixed label
//! sets, the atomic arrays and the collector that turns them into text must agree), so a
//! renamed or added series is one reviewable diff. Its tests are in `tests.rs`.
//!
//! **Why the data-path metrics are plain atomics.** prometheus-client's `Family::get_or_create`
//! takes a `parking_lot::RwLock` on every call and its `Histogram::observe` takes a write lock:
//! on a multi-threaded runtime every request would serialize on them, and a scrape (which
//! holds the read side while it encodes) would stall the request path. So everything recorded
//! per request, per connection or per handshake lives in fixed arrays of `AtomicU64`, indexed
//! by values known at compile time (direction, status code, a fixed set of reasons), and is
//! turned into Prometheus text only at scrape time by a custom [`Collector`]. Recording is one
//! `fetch_add` (two for a histogram: its bucket and its sum), `Relaxed`: counters need no
//! ordering with anything else, and a scrape that sees one series a moment ahead of another is
//! harmless. The collector emits only series that ever moved (plus `connections_open`, a fixed
//! pair of gauges), so the exposition stays as small as before.
//!
//! Metrics written off the request path (SDS, policy loads, SVID installs) keep
//! prometheus-client's own types; `trellis_authz_decisions_total` keeps its family because the
//! policy engine caches each rule's counter handle per policy load (see `crate::policy`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use trellis_identity::tls::GROUP_LABELS;

/// Traffic direction: `inbound` (peer → app) or `outbound` (app → peer).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Peer → app.
    Inbound,
    /// App → peer.
    Outbound,
}

impl Direction {
    /// Both, in index order.
    pub const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    /// Position in the fixed arrays.
    fn index(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
}

/// Which kind of listener refused a connection (`trellis_connections_refused_total{listener}`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Listener {
    /// The inbound mTLS HTTP listener.
    Inbound,
    /// An inbound raw TCP forward.
    InboundTcp,
    /// An outbound HTTP listener (shared or dedicated).
    Outbound,
    /// An outbound `protocol: tcp` listener.
    OutboundTcp,
    /// The admin listener.
    Admin,
}

impl Listener {
    /// Every listener kind, in index order.
    pub const ALL: [Listener; 5] = [
        Listener::Inbound,
        Listener::InboundTcp,
        Listener::Outbound,
        Listener::OutboundTcp,
        Listener::Admin,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Inbound => "inbound",
            Listener::InboundTcp => "inbound_tcp",
            Listener::Outbound => "outbound",
            Listener::OutboundTcp => "outbound_tcp",
            Listener::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `{listener}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// [`Listener::as_str`].
    pub listener: &'static str,
}

/// `{direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
}

/// `{direction,result,reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
    /// `ok` / `error`.
    pub result: &'static str,
    /// `none`, or `no_cert`, `unknown_ca`, `expired`, `wrong_identity`, `protocol_version`, ….
    pub reason: &'static str,
}

/// A successful handshake's labels: [`HandshakeLabel`] and the negotiated key-exchange group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeGroupLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
    /// `ok`.
    pub result: &'static str,
    /// `none`.
    pub reason: &'static str,
    /// `X25519MLKEM768`, `X25519`, `P-256`, `P-384` or `other`
    /// (`trellis_identity::tls::GROUP_LABELS`).
    pub group: &'static str,
}

/// `{direction,code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
    /// HTTP status code.
    pub code: u16,
}

/// `{worker}` of `trellis_worker_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker thread's index, 0 to `--worker-threads` - 1.
    pub worker: u16,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, or a reason such as `unknown_ca`, `wrong_identity`, `bad_key`, `malformed`.
    pub result: &'static str,
}

/// `{kind}` of `trellis_log_witness_alarms_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlarmLabel {
    /// `rollback`, `fork`, `key_changed`, `bad_signature` or `malformed`.
    pub kind: &'static str,
}

/// `{method,result}` of `trellis_workload_api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadApiLabel {
    /// The Workload API method (`FetchX509SVID`, …).
    pub method: &'static str,
    /// `ok`, or why it was refused (`missing_security_header`, `permission_denied`, …).
    pub result: &'static str,
}

/// `{route,identity,class}` of `trellis_route_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The listed upstream's name, or `default_route`.
    pub route: String,
    /// The SPIFFE ID the peer had to present: the upstream's, or the default route's
    /// identity template with `*` for its placeholders (one series per route, not per host).
    pub identity: String,
    /// `1xx` … `5xx`.
    pub class: &'static str,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One route's request counters by status class. The family's lock is taken once per class,
/// at its first request; after that, one atomic add.
pub struct RouteCounters {
    route: String,
    identity: String,
    by_class: [std::sync::OnceLock<Counter>; 5],
}

impl RouteCounters {
    /// Counters for `route` (an upstream's name or `default_route`) and its required identity.
    pub fn new(route: &str, identity: &str) -> Self {
        Self {
            route: route.into(),
            identity: identity.into(),
            by_class: Default::default(),
        }
    }

    /// Counts a request the route answered with `code`.
    pub fn record(&self, metrics: &SidecarMetrics, code: u16) {
        let Some(i) = (code / 100).checked_sub(1).map(usize::from) else {
            return;
        };
        let (Some(cell), Some(class)) = (self.by_class.get(i), STATUS_CLASSES.get(i)) else {
            return;
        };
        cell.get_or_init(|| {
            metrics
                .route_requests
                .get_or_create(&RouteLabel {
                    route: self.route.clone(),
                    identity: self.identity.clone(),
                    class,
                })
                .clone()
        })
        .inc();
    }
}

/// `{version,commit}` of `trellis_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// The release, e.g. `0.1.0`.
    pub version: &'static str,
    /// The git commit, or `unknown`.
    pub commit: &'static str,
}

/// `{decision,rule}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabel {
    /// `allow`, `deny` or `audit_deny` (an audit-mode rule would have denied).
    pub decision: &'static str,
    /// The deciding rule's name, or `default`. Bounded by the loaded policy's rules.
    pub rule: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable snake_case reason.
    pub reason: &'static str,
}

/// `{direction, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionReasonLabel {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// `{spiffe_id}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpiffeIdLabel {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
}

/// Every `reason` a handshake counter can carry: `none` for a success, then the failure
/// reasons of `trellis_identity::tls::handshake_failure_reason` and `SvidError::reason`, and
/// the proxies' own (`io`, `timeout`, `resumption_refused`, `closed`). Anything else is
/// counted as `other`, so the label set stays bounded whatever a future reason is called.
pub const HANDSHAKE_REASONS: [&str; 16] = [
    "none",
    "no_cert",
    "unknown_ca",
    "expired",
    "wrong_identity",
    "protocol_version",
    "no_shared_group",
    "not_svid",
    "bad_key",
    "malformed",
    "bad_bundle",
    "io",
    "timeout",
    "resumption_refused",
    "closed",
    "other",
];

/// Every `reason` of `trellis_authz_bad_paths_total` (`trellis_policy::PathError::reason`),
/// and `other` for anything new.
pub const BAD_PATH_REASONS: [&str; 9] = [
    "not_absolute",
    "query_or_fragment",
    "encoded_slash",
    "backslash",
    "control_character",
    "bad_escape",
    "above_root",
    "path_parameters",
    "other",
];

/// Every `reason` of `trellis_requests_refused_total`: requests answered `400` (or `414`) by
/// the sidecar for their framing or headers before any policy decision, `connect` (`405`:
/// CONNECT on the outbound port), `upgrade` (`501`: an `Upgrade` other than websocket), and
/// `other`.
pub const REFUSAL_REASONS: [&str; 10] = [
    "conflicting_lengths",
    "malformed_body",
    "uri_too_long",
    "duplicate_host",
    "invalid_host",
    "host_authority_mismatch",
    "underscore_header",
    "connect",
    "upgrade",
    "other",
];

/// Every `reason` of `trellis_request_headers_removed_total`: `owned` (a caller's spelling of a
/// header only the sidecar sets, such as `x_forwarded_client_cert`) and `underscore` (another
/// name with `_`, under `inbound.headers_with_underscores: drop`).
pub const REMOVED_HEADER_REASONS: [&str; 2] = ["owned", "underscore"];

/// Upper bounds of the latency histograms' buckets, in nanoseconds: 100 µs to 30 s, roughly
/// 1-2.5-5 per decade (a sidecar hop on loopback is ~100 µs; a handshake a few ms; 30 s is
/// the default request timeout). Slower observations land in `+Inf`.
pub const LATENCY_BUCKETS_NANOS: [u64; 17] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// Status codes `http::StatusCode` can hold: 100..=999.
const FIRST_CODE: u16 = 100;
const CODES: usize = 900;
const RESULTS: usize = 2;

/// A latency histogram recorded with atomics only: one counter per bucket of
/// [`LATENCY_BUCKETS_NANOS`] plus `+Inf`, and the sum in integer nanoseconds (so adding needs
/// no compare-and-swap loop on an `f64`). The count is the sum of the buckets, read at scrape
/// time, so `_count` always equals the `+Inf` bucket in one scrape.
pub struct AtomicHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

/// What one read of an [`AtomicHistogram`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket alone)`, finite bounds only.
    pub buckets: Vec<(f64, u64)>,
    /// Every observation, `+Inf` included.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_seconds: f64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicHistogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl AtomicHistogram {
    /// The bucket `d` falls in: the first whose bound is `>= d` (Prometheus `le`), or `+Inf`.
    pub fn bucket_of(d: Duration) -> usize {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        LATENCY_BUCKETS_NANOS.partition_point(|&bound| bound < nanos)
    }

    /// Records one observation: two relaxed atomic adds.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(Self::bucket_of(d)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Reads every bucket once.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_NANOS.len());
        for (i, cell) in self.buckets.iter().enumerate() {
            let n = cell.load(Ordering::Relaxed);
            count += n;
            if let Some(&bound) = LATENCY_BUCKETS_NANOS.get(i) {
                buckets.push((bound as f64 / 1e9, n));
            }
        }
        HistogramSnapshot {
            buckets,
            count,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The SVID whose expiry is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidExpiry {
    /// Its SPIFFE ID (the `spiffe_id` label).
    pub spiffe_id: String,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

fn zeroed(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// The lock-free part: everything recorded per request, connection or handshake.
struct DataPath {
    /// `[direction][result][reason]`, flattened.
    handshakes: Box<[AtomicU64]>,
    /// Successful handshakes, `[direction][group]` by [`GROUP_LABELS`] (the `ok` cells of
    /// `handshakes` stay 0: successes are counted here only).
    handshake_groups: [[AtomicU64; GROUP_LABELS.len()]; 2],
    handshake_seconds: [AtomicHistogram; 2],
    /// `[direction][code - 100]`, flattened.
    requests: Box<[AtomicU64]>,
    request_seconds: [AtomicHistogram; 2],
    connections_open: [AtomicI64; 2],
    bad_paths: [AtomicU64; BAD_PATH_REASONS.len()],
    /// `[direction][reason]`, by [`REFUSAL_REASONS`].
    requests_refused: [[AtomicU64; REFUSAL_REASONS.len()]; 2],
    /// By [`REMOVED_HEADER_REASONS`] (inbound only: what reaches the app).
    headers_removed: [AtomicU64; REMOVED_HEADER_REASONS.len()],
    /// Connections closed at accept because their listener was full, by [`Listener`].
    connections_refused: [AtomicU64; Listener::ALL.len()],
    /// Written on SVID install (rare); read at scrape time.
    svid_expiry: ArcSwapOption<SvidExpiry>,
}

impl DataPath {
    fn new() -> Self {
        Self {
            handshakes: zeroed(Direction::ALL.len() * RESULTS * HANDSHAKE_REASONS.len()),
            handshake_groups: Default::default(),
            handshake_seconds: Default::default(),
            requests: zeroed(Direction::ALL.len() * CODES),
            request_seconds: Default::default(),
            connections_open: Default::default(),
            bad_paths: Default::default(),
            requests_refused: Default::default(),
            headers_removed: Default::default(),
            connections_refused: Default::default(),
            svid_expiry: ArcSwapOption::empty(),
        }
    }

    fn handshake_index(direction: Direction, ok: bool, reason: usize) -> usize {
        (direction.index() * RESULTS + usize::from(!ok)) * HANDSHAKE_REASONS.len() + reason
    }

    fn request_index(direction: Direction, code: u16) -> Option<usize> {
        let offset = usize::from(code.checked_sub(FIRST_CODE)?);
        (offset < CODES).then_some(direction.index() * CODES + offset)
    }
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath").finish_non_exhaustive()
    }
}

fn position(table: &[&str], value: &str) -> usize {
    table
        .iter()
        .position(|r| *r == value)
        .unwrap_or(table.len() - 1)
}

/// Emits the [`DataPath`] series at scrape time.
#[derive(Debug)]
struct DataPathCollector(Arc<DataPath>);

impl Collector for DataPathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let d = &self.0;
        let load = |cell: &AtomicU64| cell.load(Ordering::Relaxed);

        if let Some(svid) = d.svid_expiry.load_full() {
            let mut m = encoder.encode_descriptor(
                "svid_expiry_timestamp_seconds",
                "Expiry of the current SVID, unix seconds, labelled with its SPIFFE ID.",
                None,
                MetricType::Gauge,
            )?;
            let label = SpiffeIdLabel {
                spiffe_id: svid.spiffe_id.clone(),
            };
            m.encode_family(&label)?.encode_gauge(&svid.not_after)?;
        }

        if d.handshakes.iter().any(|c| load(c) > 0)
            || d.handshake_groups.iter().flatten().any(|c| load(c) > 0)
        {
            let mut m = encoder.encode_descriptor(
                "tls_handshakes",
                "mTLS handshakes, by direction, result and reason; successes also by key-exchange group.",
                None,
                MetricType::Counter,
            )?;
            for direction in Direction::ALL {
                for (group, cell) in GROUP_LABELS
                    .iter()
                    .zip(&d.handshake_groups[direction.index()])
                {
                    let n = load(cell);
                    if n == 0 {
                        continue;
                    }
                    let label = HandshakeGroupLabel {
                        direction: direction.as_str(),
                        result: "ok",
                        reason: "none",
                        group,
                    };
                    m.encode_family(&label)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
                for ok in [true, false] {
                    for (reason_index, reason) in HANDSHAKE_REASONS.iter().enumerate() {
                        let i = DataPath::handshake_index(direction, ok, reason_index);
                        let n = d.handshakes.get(i).map_or(0, load);
                        if n == 0 {
                            continue;
                        }
                        let label = HandshakeLabel {
                            direction: direction.as_str(),
                            result: if ok { "ok" } else { "error" },
                            reason,
                        };
                        m.encode_family(&label)?
                            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                    }
                }
            }
        }

        encode_histograms(
            &mut encoder,
            "tls_handshake_duration_seconds",
            "Time to complete an mTLS handshake (successful ones), by direction.",
            &d.handshake_seconds,
        )?;

        if d.requests.iter().any(|c| load(c) > 0) {
            let mut m = encoder.encode_descriptor(
                "requests",
                "HTTP requests proxied, by direction and status code.",
                None,
                MetricType::Counter,
            )?;
            for direction in Direction::ALL {
                for code in FIRST_CODE..FIRST_CODE + CODES as u16 {
                    let n = DataPath::request_index(direction, code)
                        .and_then(|i| d.requests.get(i))
                        .map_or(0, load);
                    if n == 0 {
                        continue;
                    }
                    let label = RequestLabel {
                        direction: direction.as_str(),
                        code,
                    };
                    m.encode_family(&label)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }

        encode_histograms(
            &mut encoder,
            "request_duration_seconds",
            "Time from a request's head received to its response head sent, by direction.",
            &d.request_seconds,
        )?;

        {
            let mut m = encoder.encode_descriptor(
                "connections_open",
                "Open mTLS connections, by direction.",
                None,
                MetricType::Gauge,
            )?;
            for direction in Direction::ALL {
                let n = d.connections_open[direction.index()].load(Ordering::Relaxed);
                let label = DirectionLabel {
                    direction: direction.as_str(),
                };
                m.encode_family(&label)?.encode_gauge(&n)?;
            }
        }

        if d.connections_refused.iter().any(|c| load(c) > 0) {
            let mut m = encoder.encode_descriptor(
                "connections_refused",
                "Connections closed right after accept because their listener had \
                 max_connections open, by listener.",
                None,
                MetricType::Counter,
            )?;
            for listener in Listener::ALL {
                let n = d.connections_refused.get(listener.index()).map_or(0, load);
                if n > 0 {
                    m.encode_family(&ListenerLabel {
                        listener: listener.as_str(),
                    })?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }

        if d.requests_refused.iter().flatten().any(|c| load(c) > 0) {
            let mut m = encoder.encode_descriptor(
                "requests_refused",
                "Requests the sidecar answered itself for their framing or headers (duplicate \
                 or disagreeing Host, underscore headers, smuggling), by direction and reason.",
                None,
                MetricType::Counter,
            )?;
            for direction in Direction::ALL {
                for (cell, reason) in d.requests_refused[direction.index()]
                    .iter()
                    .zip(REFUSAL_REASONS)
                {
                    let n = load(cell);
                    if n > 0 {
                        m.encode_family(&DirectionReasonLabel {
                            direction: direction.as_str(),
                            reason,
                        })?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                    }
                }
            }
        }

        if d.headers_removed.iter().any(|c| load(c) > 0) {
            let mut m = encoder.encode_descriptor(
                "request_headers_removed",
                "Caller-supplied request header fields removed before the app: spellings of \
                 headers the sidecar owns (owned) and names with underscores (underscore).",
                None,
                MetricType::Counter,
            )?;
            for (cell, reason) in d.headers_removed.iter().zip(REMOVED_HEADER_REASONS) {
                let n = load(cell);
                if n > 0 {
                    m.encode_family(&ReasonLabel { reason })?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }

        if d.bad_paths.iter().any(|c| load(c) > 0) {
            let mut m = encoder.encode_descriptor(
                "authz_bad_paths",
                "Requests refused with 400 because their path cannot be normalized or, under pathParameters: reject, carries `;` parameters, by reason.",
                None,
                MetricType::Counter,
            )?;
            for (cell, reason) in d.bad_paths.iter().zip(BAD_PATH_REASONS) {
                let n = load(cell);
                if n > 0 {
                    m.encode_family(&ReasonLabel { reason })?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        Ok(())
    }
}

/// One histogram family, a series per direction that has observations (nothing at all if
/// neither has).
fn encode_histograms(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    by_direction: &[AtomicHistogram; 2],
) -> Result<(), std::fmt::Error> {
    let snapshots: Vec<(Direction, HistogramSnapshot)> = Direction::ALL
        .into_iter()
        .map(|d| (d, by_direction[d.index()].snapshot()))
        .filter(|(_, s)| s.count > 0)
        .collect();
    if snapshots.is_empty() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (direction, s) in snapshots {
        let label = DirectionLabel {
            direction: direction.as_str(),
        };
        m.encode_family(&label)?.encode_histogram::<NoLabelSet>(
            s.sum_seconds,
            s.count,
            &s.buckets,
            None,
        )?;
    }
    Ok(())
}

/// Every `result` of `trellis_log_own_svid_checks_total` (`log_witness::OwnSvidCheck`'s
/// labels), pre-created at 0 so an alert sees the series before the first check.
pub const OWN_SVID_CHECK_RESULTS: [&str; 3] = ["proven", "missing", "mismatch"];

/// Every sidecar metric.
pub struct SidecarMetrics {
    registry: Registry,
    data: Arc<DataPath>,
    /// `trellis_sds_connected` (0/1).
    pub sds_connected: Gauge,
    /// `trellis_sds_updates_total{result}`.
    pub sds_updates: Family<ResultLabel, Counter>,
    /// `trellis_sds_last_update_timestamp_seconds`.
    pub sds_last_update: Gauge,
    /// `trellis_svid_rotations_total`: SVIDs installed after the first.
    pub svid_rotations: Counter,
    /// `trellis_bundle_expiry_timestamp_seconds`.
    pub bundle_expiry: Gauge,
    /// `trellis_upstream_connections_total`: mTLS connections the outbound pool opened.
    pub upstream_connections: Counter,
    /// `trellis_upstream_connections_lost_total`: pooled connections closed because the peer
    /// stopped answering PINGs (a path dropping packets, a frozen peer).
    pub upstream_connections_lost: Counter,
    /// `trellis_worker_connections_total{worker}`: connections the listeners handed to each
    /// worker thread (only with `--worker-threads` > 1).
    pub worker_connections: Family<WorkerLabel, Counter>,
    /// `trellis_stalled_bodies_total`: inbound response bodies cut because they moved no data
    /// for `stream_idle_timeout` (an app stalled mid-body, or a caller that stopped reading).
    pub stalled_bodies: Counter,
    /// `trellis_authz_decisions_total{decision,rule}`. The policy engine looks a rule's
    /// counter up in the family (which takes a lock) on its first use after a policy load
    /// and keeps the handle, so the request path is a hash map lookup and an atomic add.
    /// Series of rules that no longer exist stay exported with their last counts.
    pub authz_decisions: Family<AuthzLabel, Counter>,
    /// `trellis_policy_reload_errors_total`.
    pub policy_reload_errors: Counter,
    /// `trellis_policy_loaded_timestamp_seconds` (0: no policy loaded).
    pub policy_loaded: Gauge,
    /// `trellis_policy_rules`.
    pub policy_rules: Gauge,
    /// `trellis_workload_api_requests_total{method,result}`.
    pub workload_api_requests: Family<WorkloadApiLabel, Counter>,
    /// `trellis_log_witnessed_size`: entries in the last transparency-log head this sidecar
    /// verified (0: none yet).
    pub log_witnessed_size: Gauge,
    /// `trellis_log_witness_alarms_total{kind}`: heads that showed the log was tampered with.
    pub log_witness_alarms: Family<AlarmLabel, Counter>,
    /// `trellis_log_own_svid_checks_total{result}`: verified heads by what they said of this
    /// sidecar's own SVID (`proven`, `missing`, `mismatch`).
    pub log_own_svid_checks: Family<ResultLabel, Counter>,
    /// `trellis_route_requests_total{route,identity,class}`: outbound requests by route (see
    /// [`RouteCounters`]).
    pub route_requests: Family<RouteLabel, Counter>,
}

impl std::fmt::Debug for SidecarMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarMetrics").finish_non_exhaustive()
    }
}

impl SidecarMetrics {
    /// Creates and registers every metric under `trellis_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let data = Arc::new(DataPath::new());
        let sds_connected = Gauge::default();
        let sds_updates = Family::<ResultLabel, Counter>::default();
        let sds_last_update = Gauge::default();
        let svid_rotations = Counter::default();
        let bundle_expiry = Gauge::default();
        let upstream_connections = Counter::default();
        let upstream_connections_lost = Counter::default();
        let worker_connections = Family::<WorkerLabel, Counter>::default();
        let stalled_bodies = Counter::default();
        let authz_decisions = Family::<AuthzLabel, Counter>::default();
        let policy_reload_errors = Counter::default();
        let policy_loaded = Gauge::default();
        let policy_rules = Gauge::default();
        let workload_api_requests = Family::<WorkloadApiLabel, Counter>::default();
        let log_witnessed_size = Gauge::default();
        let log_witness_alarms = Family::<AlarmLabel, Counter>::default();
        // Every kind from the start at 0, so an alert on `increase(…) > 0` sees the series.
        for kind in trellis_transparency::WitnessAlarm::KINDS {
            let _ = log_witness_alarms.get_or_create(&AlarmLabel { kind });
        }
        let log_own_svid_checks = Family::<ResultLabel, Counter>::default();
        for result in OWN_SVID_CHECK_RESULTS {
            let _ = log_own_svid_checks.get_or_create(&ResultLabel { result });
        }
        let route_requests = Family::<RouteLabel, Counter>::default();
        // One series, always 1: joins version and commit onto any other series in a query.
        let build = trellis_serve::build_info::get();
        let build_info = Family::<BuildLabel, Gauge>::default();
        build_info
            .get_or_create(&BuildLabel {
                version: build.version,
                commit: build.commit,
            })
            .set(1);
        registry.register(
            "build_info",
            "The running build: always 1, labelled with version and commit",
            build_info,
        );
        registry.register(
            "sds_connected",
            "1 while the SDS stream to the control plane is up",
            sds_connected.clone(),
        );
        registry.register(
            "sds_updates",
            "SDS updates received, by result",
            sds_updates.clone(),
        );
        registry.register(
            "sds_last_update_timestamp_seconds",
            "When the last valid SDS update was installed, unix seconds",
            sds_last_update.clone(),
        );
        registry.register(
            "svid_rotations",
            "SVIDs installed after the first",
            svid_rotations.clone(),
        );
        registry.register(
            "bundle_expiry_timestamp_seconds",
            "Earliest expiry among trust bundle CAs, unix seconds",
            bundle_expiry.clone(),
        );
        registry.register(
            "upstream_connections",
            "mTLS connections opened by the outbound pool",
            upstream_connections.clone(),
        );
        registry.register(
            "upstream_connections_lost",
            "Pooled upstream connections closed because the peer stopped answering PINGs",
            upstream_connections_lost.clone(),
        );
        registry.register(
            "worker_connections",
            "Connections handed to each worker thread, by worker (only with --worker-threads > 1)",
            worker_connections.clone(),
        );
        registry.register(
            "stalled_bodies",
            "Inbound response bodies reset after moving no data for stream_idle_timeout",
            stalled_bodies.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by decision (allow, deny, audit_deny) and deciding rule",
            authz_decisions.clone(),
        );
        registry.register(
            "policy_reload_errors",
            "Policy reloads refused (the last good policy stays in force)",
            policy_reload_errors.clone(),
        );
        registry.register(
            "policy_loaded_timestamp_seconds",
            "When the policy in force was loaded, unix seconds (0: none)",
            policy_loaded.clone(),
        );
        registry.register(
            "policy_rules",
            "Rules in the policy in force",
            policy_rules.clone(),
        );
        registry.register(
            "workload_api_requests",
            "SPIFFE Workload API calls, by method and result (ok or the refusal's reason)",
            workload_api_requests.clone(),
        );
        registry.register(
            "log_witnessed_size",
            "Entries in the last transparency-log head this sidecar verified (0: none yet)",
            log_witnessed_size.clone(),
        );
        registry.register(
            "log_witness_alarms",
            "Transparency-log heads that showed tampering, by kind (rollback, fork, key_changed, bad_signature, malformed)",
            log_witness_alarms.clone(),
        );
        registry.register(
            "log_own_svid_checks",
            "Verified transparency-log heads by what they proved of this sidecar's own SVID: proven, missing (no proof yet), mismatch (the log does not show the certificate held)",
            log_own_svid_checks.clone(),
        );
        registry.register(
            "route_requests",
            "Outbound requests by route (upstream name or default_route), required peer identity \
             (the default route's is its template, `*` for each placeholder) and status class",
            route_requests.clone(),
        );
        registry.register_collector(Box::new(DataPathCollector(Arc::clone(&data))));
        Self {
            registry,
            data,
            sds_connected,
            sds_updates,
            sds_last_update,
            svid_rotations,
            bundle_expiry,
            upstream_connections,
            upstream_connections_lost,
            worker_connections,
            stalled_bodies,
            authz_decisions,
            policy_reload_errors,
            policy_loaded,
            policy_rules,
            workload_api_requests,
            log_witnessed_size,
            log_witness_alarms,
            log_own_svid_checks,
            route_requests,
        }
    }

    /// Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a handshake; `reason` is `none` on success, one of [`HANDSHAKE_REASONS`] on
    /// failure (anything else counts as `other`). A short scan of a 16-entry table: a
    /// handshake costs thousands of times more.
    pub fn handshake(&self, direction: Direction, ok: bool, reason: &'static str) {
        if ok {
            return self.handshake_ok(direction, "other");
        }
        let reason = position(&HANDSHAKE_REASONS, reason);
        if let Some(c) = self
            .data
            .handshakes
            .get(DataPath::handshake_index(direction, ok, reason))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a successful handshake by the key-exchange group it negotiated, one of
    /// [`GROUP_LABELS`] (`trellis_identity::tls::negotiated_group`; anything else is `other`).
    pub fn handshake_ok(&self, direction: Direction, group: &str) {
        let i = position(&GROUP_LABELS, group);
        if let Some(c) = self.data.handshake_groups[direction.index()].get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how long a successful handshake took.
    pub fn handshake_duration(&self, direction: Direction, took: Duration) {
        self.data.handshake_seconds[direction.index()].observe(took);
    }

    /// Counts a proxied request by its final status and records its duration (request head
    /// received to response head sent).
    pub fn request(&self, direction: Direction, code: u16, took: Duration) {
        if let Some(c) =
            DataPath::request_index(direction, code).and_then(|i| self.data.requests.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.data.request_seconds[direction.index()].observe(took);
    }

    /// Counts a request refused because its path cannot be normalized.
    pub fn bad_path(&self, reason: &str) {
        let i = position(&BAD_PATH_REASONS, reason);
        if let Some(c) = self.data.bad_paths.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request the sidecar refused for its framing or headers; `reason` is one of
    /// [`REFUSAL_REASONS`] (anything else counts as `other`).
    pub fn request_refused(&self, direction: Direction, reason: &str) {
        let i = position(&REFUSAL_REASONS, reason);
        if let Some(c) = self.data.requests_refused[direction.index()].get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts caller-supplied header fields removed before the app: `owned` spellings of the
    /// sidecar's own headers and other `underscore` names.
    pub fn headers_removed(&self, owned: u32, underscore: u32) {
        for (cell, n) in self.data.headers_removed.iter().zip([owned, underscore]) {
            if n > 0 {
                cell.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }

    /// Counts a connection closed at accept because `listener` was full.
    pub fn connection_refused(&self, listener: Listener) {
        if let Some(c) = self.data.connections_refused.get(listener.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tracks an open mTLS connection until the guard drops.
    pub fn connection(&self, direction: Direction) -> ConnectionGuard {
        self.data.connections_open[direction.index()].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            data: Arc::clone(&self.data),
            direction,
        }
    }

    /// Sets `trellis_svid_expiry_timestamp_seconds{spiffe_id}`. One series: a new SPIFFE ID
    /// replaces the old one's.
    pub fn set_svid_expiry(&self, spiffe_id: &str, not_after: i64) {
        self.data.svid_expiry.store(Some(Arc::new(SvidExpiry {
            spiffe_id: spiffe_id.to_owned(),
            not_after,
        })));
    }

    /// The exported SVID expiry, if an SVID was ever installed.
    pub fn svid_expiry(&self) -> Option<SvidExpiry> {
        self.data.svid_expiry.load_full().map(|e| (*e).clone())
    }

    /// Counts a Workload API call by method and result.
    pub fn workload_api_request(&self, method: &'static str, result: &'static str) {
        self.workload_api_requests
            .get_or_create(&WorkloadApiLabel { method, result })
            .inc();
    }

    /// Counts an SDS update by result.
    pub fn sds_update(&self, result: &'static str) {
        self.sds_updates
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements `trellis_connections_open` on drop.
pub struct ConnectionGuard {
    data: Arc<DataPath>,
    direction: Direction,
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("direction", &self.direction)
            .finish()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.data.connections_open[self.direction.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// `Content-Type` of [`SidecarMetrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
