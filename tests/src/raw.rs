//! Raw bytes to a listener and everything that comes back until it closes: for hostile inputs
//! that no well-behaved client would send (smuggling, oversized heads, slow writers).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What a raw exchange got: the bytes that came back, and whether the peer closed the
/// connection (EOF or reset) within the wait.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Everything received, as (lossy) text.
    pub text: String,
    /// The peer closed the connection within the wait.
    pub closed: bool,
}

impl Exchange {
    /// The status of the first HTTP/1.1 response, if it starts with one.
    pub fn status(&self) -> Option<u16> {
        let line = self.text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// The status of every HTTP/1.1 response, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| self.text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

/// Sends `raw` (write errors ignored: the peer may close before reading it all), then reads
/// until EOF, an error or `wait`.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    raw: &[u8],
    wait: Duration,
) -> Exchange {
    let _ = io.write_all(raw).await;
    let _ = io.flush().await;
    read_to_close(&mut io, wait).await
}

/// Reads until EOF, an error (a reset counts as closed) or `wait`.
pub async fn read_to_close<S: AsyncRead + Unpin + ?Sized>(io: &mut S, wait: Duration) -> Exchange {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Exchange {
        text: String::from_utf8_lossy(&got).into_owned(),
        closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_statuses() {
        let e = Exchange {
            text: "HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n".into(),
            closed: true,
        };
        assert_eq!(e.status(), Some(200));
        assert_eq!(e.statuses(), vec![200, 400]);
        let none = Exchange {
            text: String::new(),
            closed: true,
        };
        assert_eq!(none.status(), None);
    }
}
