//! The admin HTTP client of the operator commands (`trellis status`, `trellis inspect --admin`):
//! one plain HTTP/1.1 request to a sidecar's or control plane's admin endpoint, with a deadline.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

/// A minimal HTTP/1.1 client for one admin endpoint.
pub struct AdminClient {
    /// `HOST:PORT`.
    addr: String,
    timeout: Duration,
}

/// One admin response.
pub struct AdminResponse {
    /// The status code.
    pub status: u16,
    /// The body as text (lossy).
    pub body: String,
}

impl AdminClient {
    /// `HOST:PORT`, `[IPv6]:PORT` or `http://HOST:PORT[/]`.
    pub fn parse(admin: &str, timeout: Duration) -> anyhow::Result<Self> {
        if timeout.is_zero() {
            bail!("--timeout must be positive");
        }
        let addr = admin
            .strip_prefix("http://")
            .unwrap_or(admin)
            .trim_end_matches('/');
        if admin.starts_with("https://") {
            bail!("--admin `{admin}`: the admin endpoint speaks plain HTTP; use http://HOST:PORT or HOST:PORT");
        }
        let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || addr.contains('/') {
            bail!("--admin `{admin}` is not HOST:PORT (for example 127.0.0.1:15000)");
        }
        Ok(AdminClient {
            addr: addr.to_owned(),
            timeout,
        })
    }

    /// `http://HOST:PORT`, for messages.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends one request and reads the whole response, within the client's timeout plus
    /// `extra` (an `/inspect` takes as long as its own handshake).
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        extra: Duration,
    ) -> anyhow::Result<AdminResponse> {
        let what = format!("{method} {}{path_and_query}", self.url());
        tokio::time::timeout(self.timeout + extra, self.send(method, path_and_query))
            .await
            .with_context(|| format!("{what}: no answer within {:?}", self.timeout + extra))?
            .with_context(|| what.clone())
    }

    /// `GET`, within the client's timeout.
    pub async fn get(&self, path: &str) -> anyhow::Result<AdminResponse> {
        self.request(Method::GET, path, Duration::ZERO).await
    }

    async fn send(&self, method: Method, path_and_query: &str) -> anyhow::Result<AdminResponse> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .context("cannot connect to the admin endpoint")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let conn = tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.addr)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        Ok(AdminResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        let t = Duration::from_secs(1);
        assert_eq!(
            AdminClient::parse("127.0.0.1:15000", t).unwrap().addr,
            "127.0.0.1:15000"
        );
        assert_eq!(
            AdminClient::parse("http://localhost:9090/", t)
                .unwrap()
                .addr,
            "localhost:9090"
        );
        assert_eq!(
            AdminClient::parse("[::1]:15000", t).unwrap().addr,
            "[::1]:15000"
        );
        for bad in [
            "127.0.0.1",
            "host:0",
            "https://127.0.0.1:1",
            "http://h:1/metrics",
            ":80",
        ] {
            assert!(AdminClient::parse(bad, t).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape("spiffe://example.org/ns/a b"),
            "spiffe%3A%2F%2Fexample.org%2Fns%2Fa%20b"
        );
        assert_eq!(query_escape("[::1]:15443"), "%5B%3A%3A1%5D%3A15443");
    }
}
