//! The TLS 1.3 cipher suites of aws-lc-rs, with an HKDF that extracts each secret once.
//!
//! rustls' aws-lc-rs provider keeps every extracted secret as aws-lc-rs' `Prk` in its
//! "extract and expand" mode (one FIPS-approved `HKDF()` call per output), so each of the ~20
//! HKDF-Expand-Label calls of a handshake's key schedule runs HKDF-Extract again and keys a
//! fresh HMAC twice: eight hash compressions where two would do. With SHA-384, whose block
//! function has no hardware path on AMD CPUs, that was 11% of a sidecar's CPU per full
//! handshake (perf, `openssl s_time -new`). Here rustls' own `HkdfUsingHmac` runs the same
//! RFC 5869 HKDF over aws-lc-rs' HMAC, whose keys keep their padded states: each secret is
//! extracted once and each expansion costs one keyed HMAC. The outputs are byte for byte
//! those of the stock suites (tested below, and against OpenSSL and Envoy end to end); only
//! the FIPS service indicator is lost, which Trellis, built without aws-lc's FIPS module,
//! never had.

use std::sync::LazyLock;

use aws_lc_rs::hmac as lc;
use rustls::crypto::aws_lc_rs::cipher_suite as stock;
use rustls::crypto::hmac;
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::{CipherSuite, CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

/// HMAC over aws-lc-rs, for rustls' `HkdfUsingHmac`.
struct AwsLcHmac(lc::Algorithm);

impl hmac::Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn hmac::Key> {
        Box::new(AwsLcHmacKey(lc::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

/// A keyed HMAC: aws-lc keeps the inner and outer padded states, so each tag hashes only the
/// message and the inner digest.
struct AwsLcHmacKey(lc::Key);

impl hmac::Key for AwsLcHmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> hmac::Tag {
        let mut ctx = lc::Context::with_key(&self.0);
        ctx.update(first);
        for part in middle {
            ctx.update(part);
        }
        ctx.update(last);
        hmac::Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(lc::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(lc::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// `stock` with its HKDF replaced by `hkdf`; everything else (AEAD, hash, limits) is the
/// stock suite's.
fn extract_once(
    stock: SupportedCipherSuite,
    hkdf: &'static HkdfUsingHmac<'static>,
) -> Tls13CipherSuite {
    let SupportedCipherSuite::Tls13(suite) = stock else {
        unreachable!("only called with TLS 1.3 suites")
    };
    Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: suite.common.suite,
            hash_provider: suite.common.hash_provider,
            confidentiality_limit: suite.common.confidentiality_limit,
        },
        hkdf_provider: hkdf,
        aead_alg: suite.aead_alg,
        quic: suite.quic,
    }
}

static AES_256_GCM_SHA384: LazyLock<Tls13CipherSuite> =
    LazyLock::new(|| extract_once(stock::TLS13_AES_256_GCM_SHA384, &HKDF_SHA384));
static AES_128_GCM_SHA256: LazyLock<Tls13CipherSuite> =
    LazyLock::new(|| extract_once(stock::TLS13_AES_128_GCM_SHA256, &HKDF_SHA256));
static CHACHA20_POLY1305_SHA256: LazyLock<Tls13CipherSuite> =
    LazyLock::new(|| extract_once(stock::TLS13_CHACHA20_POLY1305_SHA256, &HKDF_SHA256));

/// `suite`, or its extract-once twin if it is one of aws-lc-rs' TLS 1.3 suites (TLS 1.2 suites
/// and anything else come back unchanged).
pub(super) fn with_extract_once_hkdf(suite: SupportedCipherSuite) -> SupportedCipherSuite {
    let twin: &'static Tls13CipherSuite = match suite {
        SupportedCipherSuite::Tls13(_) => match suite.suite() {
            CipherSuite::TLS13_AES_256_GCM_SHA384 => &AES_256_GCM_SHA384,
            CipherSuite::TLS13_AES_128_GCM_SHA256 => &AES_128_GCM_SHA256,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => &CHACHA20_POLY1305_SHA256,
            _ => return suite,
        },
        SupportedCipherSuite::Tls12(_) => return suite,
    };
    SupportedCipherSuite::Tls13(twin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hkdf::{self, KeyType};

    /// The same RFC 5869 HKDF as aws-lc-rs' own, for both hashes, over inputs of the sizes a
    /// TLS 1.3 key schedule uses (empty salt, hash-sized secrets, labels, 12- to 48-byte
    /// outputs) and a few that are not.
    #[test]
    fn extract_once_hkdf_matches_aws_lc_rs_hkdf() {
        let cases: [(&HkdfUsingHmac<'static>, hkdf::Algorithm); 2] = [
            (&HKDF_SHA256, hkdf::HKDF_SHA256),
            (&HKDF_SHA384, hkdf::HKDF_SHA384),
        ];
        for (ours, theirs) in cases {
            let hash_len = theirs.len();
            for (salt, secret) in [
                (None, &[0u8; 48][..hash_len]),
                (Some(&[7u8; 48][..hash_len]), &[0x5a; 32][..]),
                (Some(&b"salt"[..]), &b"a secret of no particular length"[..]),
            ] {
                let expander = rustls::crypto::tls13::Hkdf::extract_from_secret(ours, salt, secret);
                let zeroes = [0u8; 48];
                let prk =
                    hkdf::Salt::new(theirs, salt.unwrap_or(&zeroes[..hash_len])).extract(secret);
                for (info, len) in [
                    (&[&b"\x00\x0ctls13 key"[..], b""][..], 16),
                    (&[&b"\x00\x0btls13 iv"[..]][..], 12),
                    (
                        &[&b"tls13 c hs traffic"[..], &[0xab; 48][..hash_len]][..],
                        hash_len,
                    ),
                    (&[&b"long"[..]][..], 3 * hash_len + 5),
                ] {
                    let mut mine = vec![0u8; len];
                    expander.expand_slice(info, &mut mine).unwrap();
                    let mut want = vec![0u8; len];
                    prk.expand(info, Len(len)).unwrap().fill(&mut want).unwrap();
                    assert_eq!(
                        mine, want,
                        "{theirs:?} salt {salt:?} info {info:?} len {len}"
                    );
                }
                let block = expander.expand_block(&[b"block"]);
                let mut want = vec![0u8; hash_len];
                prk.expand(&[b"block"], Len(hash_len))
                    .unwrap()
                    .fill(&mut want)
                    .unwrap();
                assert_eq!(block.as_ref(), &want[..]);
            }
        }
    }

    /// Output length for aws-lc-rs' `Prk::expand`.
    struct Len(usize);

    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn every_stock_tls13_suite_has_a_twin_and_tls12_suites_pass_through() {
        for suite in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES {
            let twin = with_extract_once_hkdf(*suite);
            assert_eq!(twin.suite(), suite.suite());
            match (suite, twin) {
                (SupportedCipherSuite::Tls13(stock), SupportedCipherSuite::Tls13(twin)) => {
                    let hkdf: *const dyn rustls::crypto::tls13::Hkdf = twin.hkdf_provider;
                    assert!(
                        !std::ptr::addr_eq(stock.hkdf_provider, hkdf),
                        "{:?} kept the stock HKDF",
                        suite.suite()
                    );
                    assert_eq!(stock.aead_alg.key_len(), twin.aead_alg.key_len());
                }
                (SupportedCipherSuite::Tls12(stock), SupportedCipherSuite::Tls12(same)) => {
                    assert!(std::ptr::eq(*stock, same));
                }
                _ => panic!("{:?} changed protocol version", suite.suite()),
            }
        }
    }
}
