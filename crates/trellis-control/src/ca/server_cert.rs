//! TLS serving certificates for DNS names ([`Ca::issue_server_cert`]): what the admission
//! webhook presents to the Kubernetes API server. Not SVIDs: no URI SAN, `serverAuth` only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use trellis_identity::PrivateKeyDer;
use trellis_serve::time::{rfc3339_unix as fmt_unix, unix_seconds as unix};
use zeroize::Zeroize as _;

use super::{
    exact_der, random_serial, sign_err, whole_seconds, Ca, CaError, ServerCert, CLOCK_SKEW,
};

impl Ca {
    /// Issues a TLS server certificate for `dns_names` (the admission webhook's serving
    /// certificate, which the Kubernetes API server verifies against the `caBundle` of the
    /// webhook configuration, i.e. this CA's bundle, by DNS name). A fresh P-256 key; DNS SANs
    /// only; `cA=false`; key usage `digitalSignature`; EKU `serverAuth` only (it never
    /// authenticates a client); valid from one minute before `now` until `now + ttl`, capped
    /// at the CA's own expiry, like an SVID.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCert, CaError> {
        let first = dns_names
            .first()
            .ok_or_else(|| CaError::Sign("a server certificate needs a DNS name".into()))?;
        let mut sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            // RFC 5280 4.2.1.6: a dNSName is in the "preferred name syntax"; rustls checks it
            // the same way when it verifies, so refuse here what no client could match.
            rustls::pki_types::DnsName::try_from(name.as_str())
                .map_err(|_| CaError::Sign(format!("`{name}` is not a valid DNS name")))?;
            sans.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ));
        }
        let not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        let not_after =
            whole_seconds(now.checked_add(ttl).unwrap_or(self.not_after)).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Sign(format!(
                "the signing certificate expires at {}: renew the CA",
                fmt_unix(unix(self.not_after))
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // Clients match the SANs (Go ignores the CN since 1.15); the CN only helps people
        // reading `openssl s_client` output.
        dn.push(DnType::CommonName, first.as_str());
        dn.push(DnType::OrganizationName, "Trellis");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;

        let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        key.zeroize();
        let chain = self.chain_with(exact_der(&leaf));
        let facts = trellis_identity::cert_facts(&chain[0])
            .map_err(|e| CaError::Sign(format!("issued server certificate: {e}")))?;
        Ok(ServerCert {
            chain,
            key: key_der,
            not_after: facts.not_after,
            serial_hex: facts.serial_hex,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ca::tests::{default_ca, intermediate_ca, parse, short_lived_ca, DAY};
    use trellis_identity::{CertificateDer, TrustBundle, Usage};
    use x509_parser::extensions::GeneralName;

    fn webpki_verify(
        chain: &[CertificateDer<'static>],
        bundle: &TrustBundle,
        name: &str,
    ) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        let mut roots = rustls::RootCertStore::empty();
        for r in bundle.roots() {
            roots.add(r.clone()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn server_cert_verifies_by_dns_name_against_the_bundle() {
        let (_d, _r, ca) = default_ca();
        let dns = names(&[
            "trellis-control.trellis-system.svc",
            "trellis-control.trellis-system.svc.cluster.local",
        ]);
        let cert = ca.issue_server_cert(&dns, DAY, SystemTime::now()).unwrap();
        for name in &dns {
            webpki_verify(&cert.chain, ca.bundle(), name).unwrap();
        }
        let err = webpki_verify(&cert.chain, ca.bundle(), "evil.example.com").unwrap_err();
        assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    }

    #[test]
    fn server_cert_under_an_intermediate_verifies() {
        let (_dir, ca) = intermediate_ca();
        let cert = ca
            .issue_server_cert(&names(&["webhook.example"]), DAY, SystemTime::now())
            .unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf + intermediate");
        webpki_verify(&cert.chain, ca.bundle(), "webhook.example").unwrap();
    }

    #[test]
    fn server_cert_profile_is_server_auth_only_with_dns_sans() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let cert = ca
            .issue_server_cert(&names(&["a.example", "b.example"]), DAY, now)
            .unwrap();
        let leaf = parse(&cert.chain[0]);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<&str> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => *d,
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(dns, ["a.example", "b.example"]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert_eq!(cert.serial_hex.len(), 32);
        let life = cert.not_after.duration_since(now).unwrap();
        assert!(
            life <= DAY && life > DAY - Duration::from_secs(2),
            "{life:?}"
        );
        // Not an SVID: a SPIFFE verifier refuses it.
        assert!(
            trellis_identity::verify_svid_chain(&cert.chain, ca.bundle(), now, Usage::Either)
                .is_err()
        );
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_cert_capped_at_ca_expiry_and_refused_after() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let cert = ca
            .issue_server_cert(&names(&["a.example"]), DAY, SystemTime::now())
            .unwrap();
        assert!(cert.not_after <= ca.not_after());
        let later = SystemTime::now() + 2 * DAY;
        let err = ca
            .issue_server_cert(&names(&["a.example"]), DAY, later)
            .unwrap_err();
        assert!(err.to_string().contains("renew the CA"), "{err}");
    }

    #[test]
    fn server_cert_refuses_bad_or_missing_names() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        assert!(ca.issue_server_cert(&[], DAY, now).is_err());
        for bad in ["", "has space.example", "under_score..example", "a/b"] {
            let err = ca.issue_server_cert(&names(&[bad]), DAY, now).unwrap_err();
            assert!(
                err.to_string().contains("not a valid DNS name"),
                "{bad}: {err}"
            );
        }
    }
}
