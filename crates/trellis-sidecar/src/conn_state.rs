//! The per-connection state an HTTP/1.1 service reads: drain and framing.

use crate::h1_framing::FramingReport;
use http::header::HeaderMap;
use http::Version;
use trellis_serve::graceful::ConnState;

/// A served connection's state, shared with the service that answers its requests: its drain
/// state (`trellis-serve`) and what its HTTP/1.1 framing guard found (one allocation per
/// connection for both).
#[derive(Debug, Default)]
pub(crate) struct ConnDrain {
    /// Whether the connection is draining (responses then say `Connection: close`).
    pub(crate) drain: ConnState,
    /// Filled by [`crate::h1_framing::RequestFraming`] as it reads, checked by the service per request.
    pub(crate) framing: FramingReport,
}

impl AsRef<FramingReport> for ConnDrain {
    fn as_ref(&self) -> &FramingReport {
        &self.framing
    }
}

impl ConnDrain {
    /// Called with every response: see [`ConnState::on_response`].
    pub(crate) fn on_response(&self, version: Version, headers: &mut HeaderMap) {
        self.drain.on_response(version, headers);
    }
}
