//! Full TLS 1.3 mTLS handshakes in a loop against one address, like `openssl s_time -new`, but
//! with the key exchange a Trellis sidecar offers: X25519MLKEM768 first (OpenSSL 3.0, the
//! benchmark machine's, has no ML-KEM). For the server's CPU per post-quantum handshake
//! (`tests/bench/run.sh`, issue #19).
//!
//! ```sh
//! cargo run --release -p trellis-identity --example handshake_load -- \
//!     127.0.0.1:17950 a-chain.pem a-key.pem bundle.pem 5 [pq-preferred|pq-only|classical]
//! ```
//!
//! Each connection: TCP connect, a full handshake (no resumption; the client's certificate
//! and the server's chain verified as a sidecar does, the server held to the client's trust
//! domain), close_notify, close. Prints `HANDSHAKES SECONDS GROUP` (the group the last
//! handshake negotiated), or one line on stderr and exit status 1 on the first failure.
#![allow(missing_docs)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use trellis_identity::tls::{
    negotiated_group, provider_for, KeyExchange, PeerMatch, SpiffeServerVerifier, TlsPolicy,
};
use trellis_identity::{
    cert_facts, certs_from_pem, key_from_pem, SpiffeId, TrustBundle, TrustDomain,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("handshake_load: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, chain, key, bundle, seconds, rest @ ..] = args.as_slice() else {
        bail!("usage: handshake_load ADDR CHAIN.pem KEY.pem BUNDLE.pem SECONDS [KEY_EXCHANGE]");
    };
    let kx: KeyExchange = match rest.first() {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow!("key exchange {s:?}: use one of {}", KeyExchange::ALLOWED))?,
        None => KeyExchange::PqPreferred,
    };
    let seconds: f64 = seconds
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .with_context(|| format!("seconds {seconds:?}: give a number above 0, at most 86400"))?;
    let read = |path: &str| std::fs::read(path).with_context(|| format!("cannot read {path}"));
    let chain = certs_from_pem(&read(chain)?).with_context(|| format!("{chain}: certificates"))?;
    let key = key_from_pem(&read(key)?).with_context(|| format!("{key}: private key"))?;
    let leaf = chain
        .first()
        .context("the chain file holds no certificate")?;
    let own_id = cert_facts(leaf)?
        .uri_sans
        .iter()
        .find_map(|uri| SpiffeId::parse(uri).ok())
        .context("the leaf certificate has no SPIFFE ID")?;
    let trust_domain = TrustDomain::parse(own_id.trust_domain_name())?;
    let bundle = TrustBundle::from_pem(trust_domain, &read(bundle)?)?;

    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider_for(kx)))
        .with_protocol_versions(TlsPolicy::Tls13.versions())?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            Arc::new(ArcSwap::from_pointee(bundle)),
            PeerMatch::AnyInTrustDomain,
        ))
        .with_client_auth_cert(chain, key)?;
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    // SVIDs carry no DNS name; the SPIFFE verifier ignores this one.
    let name = ServerName::try_from("trellis.invalid")?;

    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut count, mut group) = (0u64, "none");
    while Instant::now() < until {
        let mut tcp = TcpStream::connect(addr.as_str())
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut tls = rustls::ClientConnection::new(config.clone(), name.clone())?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)
                .with_context(|| format!("handshake {} with {addr}", count + 1))?;
        }
        group = negotiated_group(&tls);
        tls.send_close_notify();
        while tls.wants_write() {
            tls.write_tls(&mut tcp)?;
        }
        tcp.flush()?;
        count += 1;
    }
    println!("{count} {:.3} {group}", started.elapsed().as_secs_f64());
    Ok(())
}
