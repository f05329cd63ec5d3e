//! The State-of-the-World xDS protocol for one SDS stream, as a pure state machine.
//!
//! From Envoy's xDS protocol document:
//! - "The management server should not send a DiscoveryResponse for any DiscoveryRequest that
//!   has a stale nonce" — a request whose `response_nonce` is not the last one sent is ignored.
//! - An ACK carries the nonce and `version_info` of the response it accepts; a NACK carries the
//!   nonce, the previous good `version_info` and `error_detail`. Trellis logs and counts a NACK
//!   and does not resend the same content (it would be rejected again); the next rotation
//!   sends new content.
//! - A request with a different set of `resource_names` is answered with the new set.
//! - "In SotW, a response contains every resource the client subscribed to", so every push
//!   (rotation or bundle change) carries all subscribed names.

use trellis_identity::SpiffeId;
use trellis_proto::{DiscoveryRequest, SECRET_TYPE_URL};

use super::resources::{resolve, NameError, ResourceKind};

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send a response with the current subscription.
    Respond,
    /// Nothing to send (an ACK, or a NACK of unchanged names).
    Quiet,
    /// A NACK: log and count it. Respond if names changed too.
    Nack {
        /// The client's `error_detail.message`.
        detail: String,
        /// Whether the names changed and a response is due.
        respond: bool,
    },
    /// A stale nonce: ignore.
    Stale,
}

/// A request the stream refuses; becomes a gRPC status and ends the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Wrong `type_url`.
    TypeUrl(String),
    /// A name the caller may not have or that does not exist.
    Name(NameError),
}

impl RequestError {
    /// Stable metric reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::TypeUrl(_) => "bad_type_url",
            RequestError::Name(n) => n.reason(),
        }
    }

    /// The gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            RequestError::TypeUrl(t) => tonic::Status::invalid_argument(format!(
                "type_url `{t}` is not served here; SDS serves `{SECRET_TYPE_URL}`"
            )),
            RequestError::Name(n) => n.to_status(),
        }
    }
}

/// Per-stream protocol state. Small on purpose: the control plane keeps one per connected
/// workload, so the nonce and version of the last response are its sequence number, not
/// strings, and the caller is the stream's (passed in, not copied).
#[derive(Debug, Default)]
pub struct StreamState {
    names: Vec<(String, ResourceKind)>,
    /// Responses sent: the last one's nonce is `n{sent}` and its version `v{sent}`.
    sent: u64,
    /// `sent` as of the response the client last ACKed (0: none yet).
    acked: u64,
}

/// The envelope of a response about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `version_info`.
    pub version: String,
    /// `nonce`.
    pub nonce: String,
}

impl StreamState {
    /// A fresh stream: nothing subscribed, nothing sent.
    pub fn new() -> Self {
        Self::default()
    }

    /// The subscribed names, in request order.
    pub fn names(&self) -> &[(String, ResourceKind)] {
        &self.names
    }

    /// Whether the subscription includes `kind`.
    pub fn wants(&self, kind: ResourceKind) -> bool {
        self.names.iter().any(|(_, k)| *k == kind)
    }

    /// The version the client last ACKed.
    pub fn acked_version(&self) -> Option<String> {
        (self.acked > 0).then(|| format!("v{}", self.acked))
    }

    /// Whether `nonce` is the nonce of the last response sent (written exactly as it was).
    fn is_last_nonce(&self, nonce: &str) -> bool {
        self.sent > 0
            && nonce.strip_prefix('n').is_some_and(|digits| {
                !digits.starts_with('0')
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits.parse() == Ok(self.sent)
            })
    }

    /// Applies one request from `caller`, the stream's attested workload.
    pub fn on_request(
        &mut self,
        caller: &SpiffeId,
        req: &DiscoveryRequest,
    ) -> Result<Decision, RequestError> {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return Err(RequestError::TypeUrl(req.type_url.clone()));
        }
        let is_reply = !req.response_nonce.is_empty();
        if is_reply && !self.is_last_nonce(&req.response_nonce) {
            return Ok(Decision::Stale);
        }
        let mut names = Vec::with_capacity(req.resource_names.len());
        for name in &req.resource_names {
            let kind = resolve(name, caller).map_err(RequestError::Name)?;
            if !names
                .iter()
                .any(|(n, _): &(String, ResourceKind)| n == name)
            {
                names.push((name.clone(), kind));
            }
        }
        let changed = names != self.names;
        self.names = names;
        if !is_reply {
            // A first request, or a client re-sending its subscription: always answer.
            return Ok(if self.names.is_empty() {
                Decision::Quiet
            } else {
                Decision::Respond
            });
        }
        let respond = changed && !self.names.is_empty();
        match &req.error_detail {
            Some(status) => Ok(Decision::Nack {
                detail: status.message.clone(),
                respond,
            }),
            None => {
                // The nonce is the last response's, so this ACKs that response's version.
                self.acked = self.sent;
                Ok(if respond {
                    Decision::Respond
                } else {
                    Decision::Quiet
                })
            }
        }
    }

    /// Allocates the version and nonce of the next response and remembers it as the last.
    pub fn next_envelope(&mut self) -> Envelope {
        self.sent += 1;
        Envelope {
            version: format!("v{}", self.sent),
            nonce: format!("n{}", self.sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::google::rpc::Status;

    fn state() -> StreamState {
        StreamState::new()
    }

    fn web() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/app/web").unwrap()
    }

    fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn initial_request_is_answered() {
        let mut s = state();
        assert_eq!(
            s.on_request(&web(), &req(&["default", "ROOTCA"], "", "")),
            Ok(Decision::Respond)
        );
        assert!(s.wants(ResourceKind::Svid) && s.wants(ResourceKind::Bundle));
    }

    #[test]
    fn ack_is_quiet_and_recorded() {
        let mut s = state();
        s.on_request(&web(), &req(&["default"], "", "")).unwrap();
        let env = s.next_envelope();
        assert_eq!(
            s.on_request(&web(), &req(&["default"], &env.version, &env.nonce)),
            Ok(Decision::Quiet)
        );
        assert_eq!(s.acked_version(), Some(env.version));
    }

    #[test]
    fn nack_is_reported_not_resent() {
        let mut s = state();
        s.on_request(&web(), &req(&["default"], "", "")).unwrap();
        let env = s.next_envelope();
        let mut nack = req(&["default"], "", &env.nonce);
        nack.error_detail = Some(Status {
            code: 3,
            message: "bad key".into(),
            details: vec![],
        });
        assert_eq!(
            s.on_request(&web(), &nack),
            Ok(Decision::Nack {
                detail: "bad key".into(),
                respond: false
            })
        );
        assert_eq!(s.acked_version(), None);
    }

    #[test]
    fn stale_nonce_is_ignored() {
        let mut s = state();
        s.on_request(&web(), &req(&["default"], "", "")).unwrap();
        let first = s.next_envelope();
        let _second = s.next_envelope();
        assert_eq!(
            s.on_request(&web(), &req(&["default"], &first.version, &first.nonce)),
            Ok(Decision::Stale)
        );
        assert_eq!(
            s.on_request(&web(), &req(&["default"], "", "never-sent")),
            Ok(Decision::Stale)
        );
        // The last nonce is "n2": only exactly that string is a reply to it.
        for near in ["n02", "n+2", "2", "n", "n2 "] {
            assert_eq!(
                s.on_request(&web(), &req(&["default"], "", near)),
                Ok(Decision::Stale),
                "{near:?}"
            );
        }
        assert_eq!(
            s.on_request(&web(), &req(&["default"], "v2", "n2")),
            Ok(Decision::Quiet)
        );
        assert_eq!(s.acked_version().as_deref(), Some("v2"));
    }

    #[test]
    fn names_change_is_answered() {
        let mut s = state();
        s.on_request(&web(), &req(&["default"], "", "")).unwrap();
        let env = s.next_envelope();
        assert_eq!(
            s.on_request(
                &web(),
                &req(&["default", "ROOTCA"], &env.version, &env.nonce)
            ),
            Ok(Decision::Respond)
        );
        assert!(s.wants(ResourceKind::Bundle));
    }

    #[test]
    fn rotation_envelopes_change_version_and_nonce() {
        let mut s = state();
        let a = s.next_envelope();
        let b = s.next_envelope();
        assert_ne!(a.version, b.version);
        assert_ne!(a.nonce, b.nonce);
    }

    #[test]
    fn wrong_type_url_is_an_error() {
        let mut s = state();
        let mut r = req(&["default"], "", "");
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(
            s.on_request(&web(), &r).unwrap_err().to_status().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn another_workloads_name_is_an_error() {
        let mut s = state();
        let err = s
            .on_request(&web(), &req(&["spiffe://example.org/app/db"], "", ""))
            .unwrap_err();
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn empty_subscription_sends_nothing() {
        let mut s = state();
        assert_eq!(s.on_request(&web(), &req(&[], "", "")), Ok(Decision::Quiet));
    }
}
