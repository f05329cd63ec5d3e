//! `/metrics` read with a real exposition parser (`prometheus-parse`), for every test that
//! looks at a counter or gauge.
//!
//! A series a test names must exist: [`Metrics::sum`] and [`Metrics::series`] panic naming the
//! series (and showing what its family does have) when no sample matches, so an assertion such
//! as "errors == 0" fails loudly after a metric is renamed instead of reading `0.0`. Unlabelled
//! counters and gauges are always exported (0 until they move), so for them there is no excuse.
//! The one legitimate "absent means zero" case is a labelled family whose label set has not
//! moved yet: Trellis exports no line for it (not even `# TYPE` while the family is empty). It
//! has its own helpers, [`Metrics::sum_or_zero`] and [`Metrics::series_or_zero`], named so at
//! the call site.
//!
//! ```
//! use trellis_tests::metrics::Metrics;
//!
//! let m = Metrics::parse(
//!     "# HELP trellis_requests Requests.\n# TYPE trellis_requests counter\n\
//!      trellis_requests_total{direction=\"inbound\",code=\"200\"} 3\n\
//!      ## EOF\n",
//! )
//! .unwrap();
//! assert_eq!(m.sum("trellis_requests_total", &[("direction", "inbound")]), 3.0);
//! assert_eq!(m.series(r#"trellis_requests_total{code="200"}"#), 3.0);
//! // Not exported (yet): zero only when asked for explicitly.
//! assert_eq!(m.sum_or_zero("trellis_authz_decisions_total", &[("decision", "deny")]), 0.0);
//! assert!(m.get("trellis_authz_decisions_total", &[]).is_err());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{anyhow, bail};
use prometheus_parse::{LineInfo, Scrape, Value};

/// Suffixes a sample name carries beyond its family's name (OpenMetrics counters, histograms,
/// summaries, info metrics).
const SAMPLE_SUFFIXES: [&str; 6] = ["_total", "_bucket", "_sum", "_count", "_created", "_info"];

/// One sample: histogram buckets flattened to `<name>_bucket{…,le="…"}` as exposed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample name, e.g. `trellis_requests_total`.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition: the families it declares and every sample.
#[derive(Debug, Clone)]
pub struct Metrics {
    text: String,
    families: BTreeSet<String>,
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text 0.0.4 or OpenMetrics text (`# EOF` included). A line the parser
    /// would skip or misread (a label value with `,`, `=`, `"` or `\` in it, a value that is not
    /// a number) is an error naming it, never a silently missing sample.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut families = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |why: &str| anyhow!("/metrics line {}: {why}: {line:?}", i + 1);
            match LineInfo::parse(line) {
                LineInfo::Doc { metric_name, .. } => {
                    families.insert(metric_name.to_owned());
                }
                LineInfo::Type {
                    metric_name,
                    metric_alias,
                    ..
                } => {
                    families.insert(metric_alias.unwrap_or(metric_name));
                }
                LineInfo::Sample { labels, value, .. } => {
                    parse_value(value).ok_or_else(|| bad("the value is not a number"))?;
                    if let Some(labels) = labels {
                        check_labels(labels).map_err(|e| bad(&e))?;
                    }
                }
                LineInfo::Empty => {}
                LineInfo::Ignored if line.trim_start().starts_with('#') => {}
                LineInfo::Ignored => return Err(bad("not a sample line")),
            }
        }
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let mut samples = Vec::with_capacity(scrape.samples.len());
        for s in scrape.samples {
            let labels: BTreeMap<String, String> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => samples.push(Sample {
                    name: s.metric,
                    labels,
                    value: v,
                }),
                Value::Histogram(buckets) => {
                    for b in buckets {
                        let mut labels = labels.clone();
                        labels.insert("le".to_owned(), le_text(b.less_than));
                        samples.push(Sample {
                            name: format!("{}_bucket", s.metric),
                            labels,
                            value: b.count,
                        });
                    }
                }
                Value::Summary(quantiles) => {
                    for q in quantiles {
                        let mut labels = labels.clone();
                        labels.insert("quantile".to_owned(), q.quantile.to_string());
                        samples.push(Sample {
                            name: s.metric.clone(),
                            labels,
                            value: q.count,
                        });
                    }
                }
            }
        }
        Ok(Metrics {
            text: text.to_owned(),
            families,
            samples,
        })
    }

    /// The exposition as received.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Whether the exposition declares the family `name` belongs to (`# HELP`/`# TYPE`), or
    /// has a sample of it.
    pub fn has_family(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name) || self.family_of(name).is_some()
    }

    /// The sum of every sample of `name` whose labels include all of `labels`; an error naming
    /// the series when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let mut matching = self.matching(name, labels).peekable();
        if matching.peek().is_none() {
            bail!("{}", self.missing(name, labels));
        }
        Ok(matching.map(|s| s.value).sum())
    }

    /// [`Metrics::get`], panicking (at the caller's line) when no sample matches.
    #[track_caller]
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.get(name, labels) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Metrics::sum`], but 0 when no sample matches: only for a labelled family whose
    /// label set may not have moved yet (it has no line until then).
    pub fn sum_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// [`Metrics::sum`] for a selector written as it appears in the exposition:
    /// `name` or `name{key="value",…}` (labels matched as a subset).
    #[track_caller]
    pub fn series(&self, selector: &str) -> f64 {
        let (name, labels) = parse_selector(selector);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.sum(name, &labels)
    }

    /// [`Metrics::sum_or_zero`] for a selector (see [`Metrics::series`]).
    pub fn series_or_zero(&self, selector: &str) -> f64 {
        let (name, labels) = parse_selector(selector);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.sum_or_zero(name, &labels)
    }

    /// Every sample line of `name`, for error messages.
    pub fn lines_of(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The declared family a sample name belongs to.
    fn family_of(&self, name: &str) -> Option<&str> {
        if let Some(f) = self.families.get(name) {
            return Some(f);
        }
        SAMPLE_SUFFIXES
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find_map(|base| self.families.get(base).map(String::as_str))
    }

    /// What to say when `name{labels}` has no sample.
    fn missing(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let mut series = name.to_owned();
        if !labels.is_empty() {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = write!(series, "{{{}}}", inner.join(","));
        }
        if !self.has_family(name) {
            let prefix = name.split('_').take(2).collect::<Vec<_>>().join("_");
            let similar: Vec<&str> = self
                .families
                .iter()
                .filter(|f| f.starts_with(&prefix))
                .map(String::as_str)
                .collect();
            return format!(
                "no metric `{name}` in /metrics (renamed or not registered?); families starting with `{prefix}`: {similar:?}"
            );
        }
        let have = self.lines_of(name);
        if have.is_empty() {
            format!("no sample of `{series}` in /metrics: its family is declared but has no sample")
        } else {
            format!("no sample of `{series}` in /metrics; `{name}` has:\n{have}")
        }
    }
}

/// A sample value as the exposition writes it (`+Inf`, `NaN` included).
fn parse_value(value: &str) -> Option<f64> {
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        v => v.parse().ok(),
    }
}

/// An `le` bound as the exposition writes it.
fn le_text(le: f64) -> String {
    if le == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        le.to_string()
    }
}

/// Refuses a label set that prometheus-parse's splitter would misread (it splits on `,` and
/// `=` without regard to quotes): every pair must be `key="value"` with a plain value.
fn check_labels(labels: &str) -> Result<(), String> {
    for pair in labels.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("label pair `{pair}` has no `=`"));
        };
        let plain = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .is_some_and(|v| !v.contains(['"', '\\', '=']));
        if key.trim().is_empty() || !plain {
            return Err(format!(
                "label pair `{pair}` is not key=\"plain value\" (a value with `,`, `=`, `\"` or `\\` cannot be read reliably)"
            ));
        }
    }
    Ok(())
}

/// `name{k="v",…}` → the name and the label pairs. Panics on a malformed selector (a test bug).
#[track_caller]
fn parse_selector(selector: &str) -> (&str, Vec<(&str, String)>) {
    let Some((name, rest)) = selector.split_once('{') else {
        return (selector, Vec::new());
    };
    let inner = rest
        .strip_suffix('}')
        .unwrap_or_else(|| panic!("selector `{selector}`: no closing `}}`"));
    let labels = inner
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("selector `{selector}`: `{pair}` is not key=\"value\""));
            (k.trim(), v.trim().trim_matches('"').to_owned())
        })
        .collect();
    (name, labels)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What prometheus-client writes: OpenMetrics counters (`# TYPE x counter`, samples
    /// `x_total`), a histogram, a gauge, an empty labelled family, and `# EOF`.
    const EXPOSITION: &str = "\
# HELP trellis_requests Requests answered.
# TYPE trellis_requests counter
trellis_requests_total{direction=\"inbound\",code=\"200\"} 12
trellis_requests_total{direction=\"inbound\",code=\"403\"} 3
trellis_requests_total{direction=\"outbound\",code=\"200\"} 7
# HELP trellis_request_duration_seconds Request latency.
# TYPE trellis_request_duration_seconds histogram
# UNIT trellis_request_duration_seconds seconds
trellis_request_duration_seconds_sum{direction=\"inbound\"} 0.25
trellis_request_duration_seconds_count{direction=\"inbound\"} 15
trellis_request_duration_seconds_bucket{le=\"0.005\",direction=\"inbound\"} 10
trellis_request_duration_seconds_bucket{le=\"+Inf\",direction=\"inbound\"} 15
# HELP trellis_sds_connected Whether the SDS stream is up.
# TYPE trellis_sds_connected gauge
trellis_sds_connected 1
# HELP trellis_sds_updates SDS updates by result.
# TYPE trellis_sds_updates counter
# EOF
";

    fn m() -> Metrics {
        Metrics::parse(EXPOSITION).unwrap()
    }

    #[test]
    fn sums_matching_samples() {
        let m = m();
        assert_eq!(m.sum("trellis_requests_total", &[]), 22.0);
        assert_eq!(
            m.sum("trellis_requests_total", &[("direction", "inbound")]),
            15.0
        );
        assert_eq!(
            m.series(r#"trellis_requests_total{direction="inbound",code="403"}"#),
            3.0
        );
        assert_eq!(m.series("trellis_sds_connected"), 1.0);
    }

    #[test]
    fn reads_histograms() {
        let m = m();
        assert_eq!(m.sum("trellis_request_duration_seconds_count", &[]), 15.0);
        assert_eq!(m.sum("trellis_request_duration_seconds_sum", &[]), 0.25);
        assert_eq!(
            m.sum("trellis_request_duration_seconds_bucket", &[("le", "+Inf")]),
            15.0
        );
        assert_eq!(
            m.sum(
                "trellis_request_duration_seconds_bucket",
                &[("le", "0.005")]
            ),
            10.0
        );
    }

    #[test]
    fn a_missing_series_is_an_error_naming_it() {
        let m = m();
        let err = m
            .get("trellis_requests_total", &[("code", "500")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"trellis_requests_total{code="500"}"#),
            "{err}"
        );
        assert!(err.contains(r#"code="403""#), "shows what there is: {err}");
        let err = m.get("trellis_renamed_total", &[]).unwrap_err().to_string();
        assert!(err.contains("renamed or not registered"), "{err}");
        let err = m
            .get("trellis_sds_updates_total", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no sample"), "{err}");
    }

    #[test]
    fn zero_only_when_asked() {
        let m = m();
        assert_eq!(
            m.sum_or_zero("trellis_sds_updates_total", &[("result", "ok")]),
            0.0
        );
        assert_eq!(
            m.series_or_zero(r#"trellis_requests_total{code="500"}"#),
            0.0
        );
        let strict = std::panic::catch_unwind(|| m.sum("trellis_sds_updates_total", &[]));
        assert!(strict.is_err());
        let strict = std::panic::catch_unwind(|| m.series("trellis_gone_total"));
        assert!(strict.is_err());
    }

    #[test]
    fn refuses_lines_it_cannot_read() {
        for bad in [
            "trellis_x_total{rule=\"a,b\"} 1\n",
            "trellis_x_total{rule=\"a=b\"} 1\n",
            "trellis_x_total{rule=\"we\\\"ird\"} 1\n",
            "trellis_x_total{rule=\"a\"} many\n",
            "{rule=\"a\"} 1\n",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors() {
        assert_eq!(parse_selector("a_total"), ("a_total", vec![]));
        assert_eq!(
            parse_selector(r#"a_total{x="1",y="two"}"#),
            (
                "a_total",
                vec![("x", "1".to_owned()), ("y", "two".to_owned())]
            )
        );
    }
}
