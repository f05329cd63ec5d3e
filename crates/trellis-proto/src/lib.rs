//! Generated code for the protocols Trellis speaks. No logic lives here.
//!
//! Package and message names mirror Envoy's v3 API, so a stock Envoy is a client; the SPIFFE
//! Workload API mirrors the SPIFFE specification's proto, so every SPIFFE library is a client.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `google.rpc`: the gRPC error model.
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `envoy.*`: the subset of Envoy's data-plane API that SDS needs.
pub mod envoy {
    /// `envoy.config`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.service`.
    pub mod service {
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        /// `envoy.service.secret`.
        pub mod secret {
            /// `envoy.service.secret.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    /// `envoy.extensions`.
    pub mod extensions {
        /// `envoy.extensions.transport_sockets`.
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls`.
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`), generated from
/// `proto/spiffe/workload/workload.proto`. The specification's proto has no package, so the
/// gRPC paths are `/SpiffeWorkloadAPI/<Method>`.
pub mod workload {
    tonic::include_proto!("_");
}

/// `trellis.*`: Trellis's own small services.
pub mod trellis {
    /// `trellis.jwt`.
    pub mod jwt {
        /// `trellis.jwt.v1`: JWT-SVID minting and the JWT bundle, next to SDS.
        pub mod v1 {
            tonic::include_proto!("trellis.jwt.v1");
        }
    }
}

pub use envoy::config::core::v3::{data_source, DataSource, Node, TypedExtensionConfig};
pub use envoy::extensions::transport_sockets::tls::v3::{
    secret, spiffe_cert_validator_config, CertificateValidationContext, GenericSecret, Secret,
    SpiffeCertValidatorConfig, TlsCertificate,
};

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
/// The type URL of its config, `SPIFFECertValidatorConfig`.
pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
pub use envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
pub use envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
pub use envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};

/// The SDS type URL of a `Secret`, as Envoy sends it in `DiscoveryRequest.type_url`.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The gRPC codec for SDS: prost encoding with small per-stream buffers.
///
/// tonic's default buffers are 8 KiB for each direction of every stream, allocated when the
/// stream opens and held until it ends. A control plane holds one stream per workload, so
/// what each stream keeps is multiplied by the fleet: the decoder keeps no buffer between
/// messages (the patched tonic in third_party/ drops it once a message is decoded; it would
/// otherwise stay as large as the largest request, an Envoy's node with its extension list),
/// and the encoder's starts at [`BUFFER`] bytes and reserves exactly the size of each message
/// (a few KiB) instead of doubling.
pub mod codec {
    use std::marker::PhantomData;

    use prost::Message;
    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
    use tonic::Status;
    use tonic_prost::ProstDecoder;

    /// Initial encoding buffer.
    const BUFFER: usize = 512;
    /// Decoding buffer: none kept between messages (see the patched tonic's `Streaming`).
    const NO_BUFFER: usize = 0;
    /// Flush threshold for large messages.
    const YIELD: usize = 32 * 1024;

    /// Prost codec: no decoding buffer kept between messages, a [`BUFFER`]-sized encoding one.
    #[derive(Debug, Clone)]
    pub struct SdsCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SdsCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SdsCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = SdsEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            SdsEncoder(PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(NO_BUFFER, YIELD))
        }
    }

    /// Prost encoding that grows the buffer once, to the message's exact size.
    #[derive(Debug, Clone)]
    pub struct SdsEncoder<T>(PhantomData<T>);

    impl<T: Message> Encoder for SdsEncoder<T> {
        type Item = T;
        type Error = Status;

        fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode {e}")))
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::new(BUFFER, YIELD)
        }
    }
}
