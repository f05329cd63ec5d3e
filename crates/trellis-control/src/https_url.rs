//! The `https://` URLs the control plane fetches from (Kubernetes JWKS, federated bundle
//! endpoints): one parser and one set of rules for both.

use http::Uri;

/// An `https://host[:port]/path` URL split into what a fetch needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    url: String,
    /// Host name or IP address, without IPv6 brackets (for DNS and the TLS server name).
    pub(crate) host: String,
    /// The port (443 when not given).
    pub(crate) port: u16,
    /// `host[:port]`, as the `Host` header carries it.
    pub(crate) authority: String,
    /// Path and query (`/` when empty).
    pub(crate) path_and_query: String,
}

impl HttpsUrl {
    /// Parses and checks `url`: `https` only (what is fetched decides who gets which identity:
    /// it must come from an authenticated server), a host, no user information. The error is
    /// the problem alone (callers name the URL or the field); `example` is offered when the
    /// scheme is wrong.
    pub fn parse(url: &str, example: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("must be an https:// URL, e.g. {example}"));
        }
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry user information".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("has no host".into());
        }
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(Self {
            url: url.to_owned(),
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path_and_query,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}
