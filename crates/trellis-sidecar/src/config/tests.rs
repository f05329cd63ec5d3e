//! Unit tests of the parent module.
use super::*;

const GOOD: &str = r#"
trust_domain: example.org
identity:
  files: { cert: a.pem, key: k.pem, bundle: b.pem }
outbound:
  upstreams:
    - name: b
      hosts: [Service-B]
      address: 127.0.0.1:15443
      identity: spiffe://example.org/b
"#;

#[test]
fn policy_is_optional_and_passed_through() {
    let s =
        SidecarSettings::from_file(SidecarFile::parse(GOOD, Path::new("s.yaml")).unwrap()).unwrap();
    assert_eq!(s.policy, None);
    let with = format!("{GOOD}policy: /etc/trellis/policy\n");
    let s = SidecarSettings::from_file(SidecarFile::parse(&with, Path::new("s.yaml")).unwrap())
        .unwrap();
    assert_eq!(s.policy, Some(PathBuf::from("/etc/trellis/policy")));
}

#[test]
fn app_protocol_defaults_to_http1_and_names_bad_values() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    assert_eq!(parse(GOOD).unwrap().app_protocol, AppProtocol::Http1);
    let h2c = format!("{GOOD}inbound:\n  app_protocol: h2c\n");
    assert_eq!(parse(&h2c).unwrap().app_protocol, AppProtocol::H2c);
    let bad = format!("{GOOD}inbound:\n  app_protocol: grpc\n");
    let err = parse(&bad).unwrap_err().to_string();
    // The bad value is on the text's last line; the error names the file, that line and both
    // allowed values.
    let line = format!("line {}", bad.lines().count());
    assert!(
        err.contains("s.yaml") && err.contains(&line) && err.contains("`http1` or `h2c`"),
        "{err}"
    );
}

#[test]
fn headers_with_underscores_defaults_to_drop_and_names_bad_values() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    let s = parse(GOOD).unwrap();
    assert_eq!(s.headers_with_underscores, UnderscoreHeaders::Drop);
    let reject = format!("{GOOD}inbound:\n  headers_with_underscores: reject\n");
    assert_eq!(
        parse(&reject).unwrap().headers_with_underscores,
        UnderscoreHeaders::Reject
    );
    let bad = format!("{GOOD}inbound:\n  headers_with_underscores: maybe\n");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("s.yaml") && err.contains("line") && err.contains("`drop`, `reject`"),
        "{err}"
    );
}

#[test]
fn access_log_defaults_to_on_and_can_be_switched_off() {
    let s =
        SidecarSettings::from_file(SidecarFile::parse(GOOD, Path::new("s.yaml")).unwrap()).unwrap();
    assert!(s.access_log);
    let off = format!("{GOOD}access_log: false\n");
    let s =
        SidecarSettings::from_file(SidecarFile::parse(&off, Path::new("s.yaml")).unwrap()).unwrap();
    assert!(!s.access_log);
    let bad = format!("{GOOD}access_log: sometimes\n");
    let err = SidecarFile::parse(&bad, Path::new("s.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("access_log") && err.contains("line"), "{err}");
}

#[test]
fn good_file_validates() {
    let s =
        SidecarSettings::from_file(SidecarFile::parse(GOOD, Path::new("s.yaml")).unwrap()).unwrap();
    assert_eq!(s.upstreams[0].hosts, ["service-b"]);
    assert_eq!(s.inbound_listen.port(), 15443);
    assert_eq!(s.tls_policy, TlsPolicy::Tls13);
}

#[test]
fn tls_key_exchange_defaults_to_pq_preferred_and_bad_values_are_located() {
    let s =
        SidecarSettings::from_file(SidecarFile::parse(GOOD, Path::new("s.yaml")).unwrap()).unwrap();
    assert_eq!(s.tls_key_exchange, KeyExchange::PqPreferred);
    let only = format!("{GOOD}tls_key_exchange: pq-only\n");
    let s = SidecarSettings::from_file(SidecarFile::parse(&only, Path::new("s.yaml")).unwrap())
        .unwrap();
    assert_eq!(s.tls_key_exchange, KeyExchange::PqOnly);
    let bad = format!("{GOOD}tls_key_exchange: quantum\n");
    let line = bad.lines().count();
    let err = SidecarFile::parse(&bad, Path::new("s.yaml"))
        .unwrap_err()
        .to_string();
    for needle in [
        "s.yaml: ".to_owned(),
        "tls_key_exchange".to_owned(),
        "quantum".to_owned(),
        format!("line {line}"),
        "pq-preferred".to_owned(),
        "pq-only".to_owned(),
        "classical".to_owned(),
    ] {
        assert!(err.contains(&needle), "{needle:?} not in {err}");
    }
}

#[test]
fn unknown_field_is_located() {
    let err = SidecarFile::parse(
        "trust_domain: x\ninbound:\n  lisen: 1.2.3.4:5\n",
        Path::new("s.yaml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("s.yaml: ") && err.contains("lisen") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn tcp_upstream_needs_listen() {
    let text = GOOD.replace("address:", "protocol: tcp\n      address:");
    let err = SidecarSettings::from_file(SidecarFile::parse(&text, Path::new("s.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("dedicated `listen`"), "{err}");
}

#[test]
fn upstream_identity_of_another_trust_domain_is_accepted_for_federation() {
    // SPIFFE federation: the handshake checks it against that domain's bundle (and fails if
    // the control plane federates with no such domain), so the config accepts it.
    let text = GOOD.replace("spiffe://example.org/b", "spiffe://other.org/b");
    let settings =
        SidecarSettings::from_file(SidecarFile::parse(&text, Path::new("s.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        settings.upstreams[0].identity.as_str(),
        "spiffe://other.org/b"
    );
}

#[test]
fn sds_needs_exactly_one_credential() {
    let text = "trust_domain: example.org\nidentity:\n  sds: { control_plane: 'x:1', control_bundle: b.pem }\n";
    let err = SidecarSettings::from_file(SidecarFile::parse(text, Path::new("s.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token_file") && err.contains("join_token"),
        "{err}"
    );
}

const SDS: &str = "trust_domain: example.org\nidentity:\n  sds:\n    control_plane: 'cp:8443'\n    join_token: t\n";

#[test]
fn control_bundle_is_a_path_or_pem_text() {
    let path = format!("{SDS}    control_bundle: /b.pem\n");
    let s = SidecarSettings::from_file(SidecarFile::parse(&path, Path::new("s.yaml")).unwrap())
        .unwrap();
    let IdentitySource::Sds(sds) = s.identity else {
        panic!("sds")
    };
    assert_eq!(sds.control_bundle, ControlBundle::File("/b.pem".into()));

    let pem = format!("{SDS}    control_bundle_pem: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"\n");
    let s =
        SidecarSettings::from_file(SidecarFile::parse(&pem, Path::new("s.yaml")).unwrap()).unwrap();
    let IdentitySource::Sds(sds) = s.identity else {
        panic!("sds")
    };
    assert_eq!(
        sds.control_bundle,
        ControlBundle::Pem("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into())
    );
    assert_eq!(format!("{:?}", sds.control_bundle), "Pem(59 bytes)");
}

#[test]
fn control_bundle_needs_exactly_one_source() {
    let err = SidecarSettings::from_file(SidecarFile::parse(SDS, Path::new("s.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("control_bundle") && err.contains("TRELLIS_CONTROL_BUNDLE_PEM"),
        "{err}"
    );
    let both = format!("{SDS}    control_bundle: /b.pem\n    control_bundle_pem: x\n");
    let err = SidecarSettings::from_file(SidecarFile::parse(&both, Path::new("s.yaml")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exactly one") && err.contains("not both"),
        "{err}"
    );
}

fn settings(text: &str) -> Result<SidecarSettings, String> {
    let file = SidecarFile::parse(text, Path::new("s.yaml")).map_err(|e| e.to_string())?;
    SidecarSettings::from_file(file).map_err(|e| e.to_string())
}

#[test]
fn limits_default_safely_and_are_range_checked() {
    let s = settings(GOOD).unwrap();
    assert_eq!(s.limits, Limits::default());
    assert_eq!(s.limits.inbound.handshake_timeout, Duration::from_secs(10));
    let set = format!("{GOOD}limits:\n  http:\n    max_headers: 20\n    idle_timeout: 5s\n");
    let s = settings(&set).unwrap();
    assert_eq!(s.limits.http.max_headers, 20);
    assert_eq!(s.limits.http.idle_timeout, Duration::from_secs(5));
    for (bad, field) in [
        ("http: { max_header_bytes: 10 }", "http.max_header_bytes"),
        ("http: { max_headers: 0 }", "http.max_headers"),
        ("http: { max_uri_bytes: 100000 }", "http.max_uri_bytes"),
        ("inbound: { max_connections: 0 }", "inbound.max_connections"),
        (
            "outbound: { max_connections: 0 }",
            "outbound.max_connections",
        ),
        (
            "inbound: { handshake_timeout: 0s }",
            "inbound.handshake_timeout",
        ),
        (
            "http: { header_read_timeout: 0s }",
            "http.header_read_timeout",
        ),
        (
            "h2: { max_concurrent_streams: 0 }",
            "h2.max_concurrent_streams",
        ),
        (
            "h2: { max_header_list_bytes: 10 }",
            "h2.max_header_list_bytes",
        ),
    ] {
        let err = settings(&format!("{GOOD}limits:\n  {bad}\n")).unwrap_err();
        assert!(err.contains(&format!("`limits.{field}`")), "{bad}: {err}");
        assert!(
            err.contains("use ") || err.contains("at least"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn reset_stream_bound_follows_the_stream_limit_unless_set() {
    // A caller cancelling all it may have open must stay under the rapid-reset bound, so an
    // operator who raises (or lowers) the stream limit moves the bound with it.
    for (limits, streams, resets) in [
        ("", 1024, 1024),
        ("h2: { max_concurrent_streams: 4096 }", 4096, 4096),
        ("h2: { max_concurrent_streams: 100 }", 100, 100),
        (
            "h2: { max_concurrent_streams: 4096, max_pending_accept_reset_streams: 64 }",
            4096,
            64,
        ),
        ("h2: { max_pending_accept_reset_streams: 2000 }", 1024, 2000),
    ] {
        let text = if limits.is_empty() {
            GOOD.to_owned()
        } else {
            format!("{GOOD}limits:\n  {limits}\n")
        };
        let l = settings(&text).unwrap().limits;
        assert_eq!(l.h2.max_concurrent_streams, streams, "{limits}");
        assert_eq!(l.h2.max_pending_accept_reset_streams, resets, "{limits}");
    }
}

#[test]
fn admin_and_h2_limits_default_safely_and_are_range_checked() {
    let d = Limits::default();
    assert_eq!(d.h2.max_pending_accept_reset_streams, 1024);
    assert_eq!(d.h2.max_local_error_reset_streams, 1024);
    assert_eq!(d.h2.max_concurrent_reset_streams, 10);
    assert_eq!(d.h2.keepalive_interval, Duration::from_secs(5));
    assert_eq!(d.h2.keepalive_timeout, Duration::from_secs(5));
    assert_eq!(d.h2.stream_idle_timeout, Duration::from_secs(300));
    assert_eq!(d.admin.max_connections, 64);
    assert_eq!(d.admin.max_header_bytes, 8 << 10);
    assert_eq!(d.admin.max_headers, 32);
    assert_eq!(d.admin.header_read_timeout, Duration::from_secs(10));
    assert_eq!(d.admin.idle_timeout, Duration::from_secs(60));

    let set = format!(
            "{GOOD}limits:\n  h2:\n    max_pending_accept_reset_streams: 5\n    \
             max_local_error_reset_streams: 100\n    max_concurrent_reset_streams: 3\n    \
             keepalive_interval: 5s\n    keepalive_timeout: 2s\n  admin:\n    max_connections: 4\n    \
             max_header_bytes: 16384\n    max_headers: 8\n    \
             header_read_timeout: 1s\n    idle_timeout: 2s\n"
        );
    let l = settings(&set).unwrap().limits;
    assert_eq!(l.h2.max_pending_accept_reset_streams, 5);
    assert_eq!(l.h2.max_local_error_reset_streams, 100);
    assert_eq!(l.h2.max_concurrent_reset_streams, 3);
    assert_eq!(l.h2.keepalive_interval, Duration::from_secs(5));
    assert_eq!(l.h2.keepalive_timeout, Duration::from_secs(2));
    assert_eq!(l.admin.max_connections, 4);
    assert_eq!(l.admin.max_header_bytes, 16384);
    assert_eq!(l.admin.max_headers, 8);
    assert_eq!(l.admin.header_read_timeout, Duration::from_secs(1));
    assert_eq!(l.admin.idle_timeout, Duration::from_secs(2));
    // Untouched fields keep their defaults.
    assert_eq!(l.http, d.http);
    let server = l.admin_server();
    assert_eq!(server.max_pending_resets, 5);
    assert_eq!(server.max_headers, Some(8));

    for (bad, field) in [
        (
            "h2: { max_pending_accept_reset_streams: 0 }",
            "h2.max_pending_accept_reset_streams",
        ),
        (
            "h2: { max_pending_accept_reset_streams: 65537 }",
            "h2.max_pending_accept_reset_streams",
        ),
        (
            "h2: { max_local_error_reset_streams: 0 }",
            "h2.max_local_error_reset_streams",
        ),
        (
            "h2: { max_concurrent_reset_streams: 0 }",
            "h2.max_concurrent_reset_streams",
        ),
        (
            "h2: { max_concurrent_reset_streams: 100000 }",
            "h2.max_concurrent_reset_streams",
        ),
        ("h2: { keepalive_interval: 0s }", "h2.keepalive_interval"),
        ("h2: { keepalive_timeout: 1ms }", "h2.keepalive_timeout"),
        ("admin: { max_connections: 0 }", "admin.max_connections"),
        (
            "admin: { max_header_bytes: 4096 }",
            "admin.max_header_bytes",
        ),
        (
            "admin: { max_header_bytes: 1048576 }",
            "admin.max_header_bytes",
        ),
        ("admin: { max_headers: 0 }", "admin.max_headers"),
        (
            "admin: { header_read_timeout: 0s }",
            "admin.header_read_timeout",
        ),
        ("admin: { idle_timeout: 0s }", "admin.idle_timeout"),
    ] {
        let err = settings(&format!("{GOOD}limits:\n  {bad}\n")).unwrap_err();
        assert!(err.contains(&format!("`limits.{field}`")), "{bad}: {err}");
    }
    let err = settings(&format!("{GOOD}limits:\n  admin:\n    max_connection: 4\n")).unwrap_err();
    assert!(
        err.contains("max_connection") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn a_flat_limit_key_names_its_new_nested_key() {
    for (old, new) in limits::MOVED_KEYS {
        let text = format!("{GOOD}limits:\n  {old}: 1\n");
        let err = settings(&text).unwrap_err();
        assert!(
            err.starts_with("s.yaml: line ")
                && err.contains(&format!("`limits.{old}` is now `{new}`")),
            "{old}: {err}"
        );
        assert!(err.contains("line "), "{old}: {err}");
    }
    // Every new key exists: setting it parses (values checked elsewhere).
    for (_, new) in limits::MOVED_KEYS {
        let mut path = new.split('.').skip(1);
        let (group, key) = (path.next().unwrap(), path.next().unwrap());
        let value = if key.ends_with("timeout") || key.ends_with("interval") {
            "1s"
        } else {
            "1"
        };
        let text = format!("{GOOD}limits:\n  {group}:\n    {key}: {value}\n");
        SidecarFile::parse(&text, Path::new("s.yaml")).unwrap();
    }
}

#[test]
fn join_token_is_redacted_in_debug() {
    let c = Credential::JoinToken(zeroize::Zeroizing::new("trellis-join.secret".into()));
    assert!(!format!("{c:?}").contains("secret"));
}

#[test]
fn workload_api_is_off_by_default_and_takes_a_socket_path() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    assert_eq!(parse(GOOD).unwrap().workload_api_socket, None);
    let on = format!("{GOOD}workload_api: {{ socket: /run/spiffe/workload.sock }}\n");
    assert_eq!(
        parse(&on).unwrap().workload_api_socket,
        Some(PathBuf::from("/run/spiffe/workload.sock"))
    );
    let empty = format!("{GOOD}workload_api: {{ socket: \"\" }}\n");
    let err = parse(&empty).unwrap_err().to_string();
    assert!(err.contains("workload_api.socket"), "{err}");
    let typo = format!("{GOOD}workload_api: {{ path: /x.sock }}\n");
    let err = parse(&typo).unwrap_err().to_string();
    assert!(err.contains("s.yaml") && err.contains("socket"), "{err}");
}

const ROUTE: &str = r#"
trust_domain: example.org
identity:
  files: { cert: a.pem, key: k.pem, bundle: b.pem }
outbound:
  default_route:
    hosts: ["{service}.{namespace}.svc.cluster.local", "{service}.{namespace}"]
    address: "{service}.{namespace}.svc.cluster.local:15443"
    identity: "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
"#;

#[test]
fn default_route_loads_with_defaults() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    let s = parse(ROUTE).unwrap();
    let d = s.default_route.unwrap();
    assert_eq!(d.max_peers, defaults::MAX_PEERS);
    assert_eq!(s.resolve_ttl, defaults::RESOLVE_TTL);
    assert_eq!(parse(GOOD).unwrap().default_route.map(|_| ()), None);
}

#[test]
fn default_route_template_errors_name_file_and_line() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    for (from, to, want) in [
        (
            "{service}.{namespace}.svc.cluster.local\"",
            "{svc}.{namespace}.svc.cluster.local\"",
            "unknown placeholder `{svc}`",
        ),
        (
            "\"{service}.{namespace}\"]",
            "\"{namespace}.x\"]",
            "{service} exactly once",
        ),
        (
            "sa/{service}\"",
            "sa/{name}\"",
            "unknown placeholder `{name}`",
        ),
        (".local:15443\"", ".local\"", "literal port"),
    ] {
        let bad = ROUTE.replace(from, to);
        assert_ne!(bad, ROUTE, "{from}");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("s.yaml: ") && err.contains("line ") && err.contains(want),
            "{want}: {err}"
        );
    }
}

#[test]
fn default_route_identity_must_stay_in_the_trust_domain() {
    let parse = |text: &str| {
        SidecarFile::parse(text, Path::new("s.yaml")).and_then(SidecarSettings::from_file)
    };
    let bad = ROUTE.replace("spiffe://{trust_domain}/", "spiffe://other.org/");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("outbound.default_route.identity") && err.contains("not in trust domain"),
        "{err}"
    );
    let ttl = format!("{ROUTE}  resolve_ttl: 1h\n");
    let err = parse(&ttl).unwrap_err().to_string();
    assert!(
        err.contains("outbound.resolve_ttl") && err.contains("1s to 5m"),
        "{err}"
    );
}

#[test]
fn the_one_line_default_route_is_checked_like_the_files() {
    let spec = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},\
                address={service}.{namespace}.svc.cluster.local:15443,\
                identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service},max_peers=8";
    assert_eq!(check_default_route(spec, "example.org"), Ok(()));
    let parsed = DefaultRouteFile::parse_spec(spec).unwrap();
    assert_eq!(parsed.hosts.len(), 2);
    assert_eq!(parsed.max_peers, Some(8));
    for (bad, want) in [
        (
            spec.replace("{trust_domain}", "other.org"),
            "identity: `spiffe://other.org/ns/{namespace}/sa/{service}` gives",
        ),
        (spec.replace("max_peers=8", "max_peers=0"), "max_peers"),
        (
            spec.replace("{service}.{namespace},", "{service},"),
            "binds none",
        ),
        (spec.replace(":15443", ""), "literal port"),
        ("off".to_owned(), "`off` is not key=value"),
        (
            "hosts={service},adress=x".to_owned(),
            "unknown key `adress`",
        ),
    ] {
        let err = check_default_route(&bad, "example.org").unwrap_err();
        assert!(err.contains(want), "{bad}: {err}");
    }
}
