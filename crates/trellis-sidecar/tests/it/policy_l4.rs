//! L4 rules on the inbound TCP forwards: a connection the policy denies is closed right
//! after the handshake, one it allows is spliced to the app, and a reload that denies an
//! open connection closes it.
#![allow(clippy::unwrap_used)]

use crate::datapath_support;
use crate::policy_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use datapath_support::raw_http1;
use policy_support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn with_db_rule(port: u16) -> String {
    format!(
        "{POLICY}  - name: db-clients
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    ports: [{port}]
"
    )
}

/// A request through the TCP forward; `None` when the connection was closed on us.
async fn through(addr: SocketAddr) -> Option<String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    match raw_http1(&mut tcp, "service-b", "/tcp", "").await {
        Ok(text) if !text.is_empty() => Some(text),
        _ => None,
    }
}

async fn eventually_through(addr: SocketAddr, allowed: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if through(addr).await.is_some() == allowed {
            return;
        }
        assert!(Instant::now() < deadline, "TCP still not allowed={allowed}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tcp_connection_without_an_l4_rule_is_closed() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let db = pm.tcp_caller(SERVICE_A_PATH).await;
    assert_eq!(through(db).await, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pm.metric_or_zero("trellis_authz_decisions_total{decision=\"deny\",rule=\"default\"}")
        == 0
    {
        assert!(Instant::now() < deadline, "the denial was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn l4_rule_for_the_listen_port_lets_the_caller_through_and_a_reload_closes_it() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let port = pm.inbound.addrs.tcp[0].port();
    let db = pm.tcp_caller(SERVICE_A_PATH).await;
    pm.write_in_place(&with_db_rule(port));
    eventually_through(db, true).await;
    let text = through(db).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        pm.metric("trellis_authz_decisions_total{decision=\"allow\",rule=\"db-clients\"}") >= 1
    );

    // An open forward is closed when a reload denies it.
    let mut open = TcpStream::connect(db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pm.metric_or_zero("trellis_authz_decisions_total{decision=\"allow\",rule=\"db-clients\"}")
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the open connection was never decided"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pm.write_in_place(POLICY);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the denied TCP connection stayed open");
    eventually_through(db, false).await;
}
