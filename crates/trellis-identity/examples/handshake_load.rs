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
//! domain; no SNI, as `s_time` to an IP address), close_notify, then read until the server
//! closes, so a client certificate the server refuses (TLS 1.3 says so only after the
//! client's side of the handshake is done) is an error, not a count. Prints
//! `HANDSHAKES SECONDS GROUP` (the group the last handshake negotiated), or one line on stderr
//! and exit status 1 on the first failure.
#![allow(missing_docs)]

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use trellis_identity::tls::{
    client_config, install_key_exchange, negotiated_group, KeyExchange, PeerMatch,
    SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{Svid, TrustBundle, TrustDomain};

fn main() {
    if let Err(e) = run() {
        eprintln!("handshake_load: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: handshake_load IP:PORT CHAIN.pem KEY.pem BUNDLE.pem SECONDS [KEY_EXCHANGE]";
    let [addr, chain, key, bundle, seconds, rest @ ..] = args.as_slice() else {
        bail!(usage);
    };
    let kx: KeyExchange = match rest {
        [] => KeyExchange::PqPreferred,
        [s] => s
            .parse()
            .map_err(|_| anyhow!("key exchange {s:?}: use one of {}", KeyExchange::ALLOWED))?,
        _ => bail!("unexpected arguments after the key exchange; {usage}"),
    };
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("address {addr:?}: give IP:PORT, e.g. 127.0.0.1:15006"))?;
    let seconds: f64 = seconds
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .with_context(|| format!("seconds {seconds:?}: give a number above 0, at most 86400"))?;
    // The process-wide setting, as the binaries install it, so the config below is a
    // sidecar's own (`client_config`: TLS 1.3, no resumption, no 0-RTT).
    install_key_exchange(kx)?;
    let read = |path: &str| std::fs::read(path).with_context(|| format!("cannot read {path}"));
    let svid = Svid::from_pem(&read(chain)?, &read(key)?)
        .with_context(|| format!("{chain} and {key}: not an SVID and its key"))?;
    let trust_domain = TrustDomain::parse(svid.spiffe_id().trust_domain_name())?;
    let bundle = TrustBundle::from_pem(trust_domain, &read(bundle)?)
        .with_context(|| format!("{bundle}: trust bundle"))?;
    let resolver = SvidResolver::empty();
    resolver.install(&svid)?;
    let verifier = SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(bundle)),
        PeerMatch::AnyInTrustDomain,
    );
    // No ALPN, as `s_time`.
    let config = Arc::new(client_config(
        Some(resolver),
        verifier,
        TlsPolicy::Tls13,
        &[],
    )?);
    // An IP address: no SNI, as `s_time -connect IP:PORT` (the SPIFFE verifier checks the
    // SPIFFE ID, not the name).
    let name = ServerName::IpAddress(addr.ip().into());
    let io_bound = Some(Duration::from_secs(10));

    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut count, mut group) = (0u64, "none");
    while Instant::now() < until {
        let which = || format!("handshake {} with {addr}", count + 1);
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(io_bound)?;
        tcp.set_write_timeout(io_bound)?;
        let mut tls = rustls::ClientConnection::new(config.clone(), name.clone())?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).with_context(which)?;
        }
        group = negotiated_group(&tls);
        tls.send_close_notify();
        while tls.wants_write() {
            tls.write_tls(&mut tcp).with_context(which)?;
        }
        tcp.flush().with_context(which)?;
        // The server's tickets, its verdict on our certificate (an alert if refused) and its
        // own close_notify; a reset after our close_notify is a close too.
        loop {
            match tls.read_tls(&mut tcp) {
                Ok(0) => break,
                Ok(_) => {
                    let state = tls.process_new_packets().with_context(which)?;
                    if state.peer_has_closed() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e).with_context(which),
            }
        }
        count += 1;
    }
    println!("{count} {:.3} {group}", started.elapsed().as_secs_f64());
    Ok(())
}
