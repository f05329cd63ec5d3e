//! The control plane's settings: defaults, every refusal naming its field, and the keys that
//! moved under `limits:`.

use super::*;
use crate::attest::{jwks_url, K8sKeySource};

#[test]
fn unknown_field_names_file_and_line() {
    let err = ControlFile::parse(
        "trust_domain: example.org\nlisten_addr: 1.2.3.4:5\n",
        Path::new("/etc/trellis/control.yaml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("/etc/trellis/control.yaml: "), "{err}");
    assert!(err.contains("unknown field `listen_addr`"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn issuance_retention_defaults_and_is_checked() {
    let f = ControlFile::parse("trust_domain: example.org\n", Path::new("c.yaml")).unwrap();
    let s = ControlSettings::from_file(f).unwrap();
    assert_eq!(
        s.issuance_retention,
        crate::recorder::DEFAULT_ISSUANCE_RETENTION
    );
    let f = ControlFile::parse(
        "trust_domain: example.org\nissuance_retention: 30d\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let s = ControlSettings::from_file(f).unwrap();
    assert_eq!(s.issuance_retention, Duration::from_secs(30 * 86_400));
    let f = ControlFile::parse(
        "trust_domain: example.org\nissuance_retention: 5s\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let err = ControlSettings::from_file(f).unwrap_err().to_string();
    assert!(err.contains("issuance_retention"), "{err}");
}

#[test]
fn bad_duration_is_located() {
    let err = ControlFile::parse("svid_ttl: soon\n", Path::new("c.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("c.yaml") && err.contains("line 1"), "{err}");
}

#[test]
fn rotation_must_be_shorter_than_ttl() {
    let f = ControlFile {
        trust_domain: Some("example.org".into()),
        svid_ttl: Some(Duration::from_secs(60)),
        rotate_every: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let err = ControlSettings::from_file(f).unwrap_err().to_string();
    assert!(err.contains("rotate_every"), "{err}");
}

#[test]
fn missing_trust_domain_says_what_to_do() {
    let err = ControlSettings::from_file(ControlFile::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--trust-domain"), "{err}");
}

fn with_webhook(edit: impl FnOnce(&mut ControlFile)) -> Result<ControlSettings, ConfigError> {
    let mut f = ControlFile {
        trust_domain: Some("example.org".into()),
        webhook_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    edit(&mut f);
    ControlSettings::from_file(f)
}

#[test]
fn webhook_is_off_unless_listen_is_set() {
    let s = ControlSettings::from_file(ControlFile {
        trust_domain: Some("example.org".into()),
        sidecar_image: Some("registry.example/trellis:1".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(s.webhook.is_none());
}

#[test]
fn webhook_defaults_and_names() {
    let w = with_webhook(|_| {}).unwrap().webhook.unwrap();
    assert_eq!(w.dns_names, [crate::webhook::settings::defaults::DNS_NAME]);
    assert_eq!(
        w.sidecar_image,
        crate::webhook::settings::defaults::SIDECAR_IMAGE
    );
    assert_eq!(
        w.sidecar_control_plane,
        crate::webhook::settings::defaults::SIDECAR_CONTROL_PLANE
    );
    assert_eq!(
        w.limits.max_connections,
        crate::webhook::settings::defaults::MAX_CONNECTIONS
    );
    assert_eq!(
        w.limits.max_body_bytes,
        crate::webhook::settings::defaults::MAX_BODY_BYTES
    );
    let w = with_webhook(|f| {
        f.webhook_dns_names = Some(vec![
            "Trellis-Control.trellis-system.svc".into(),
            "trellis-control.trellis-system.svc".into(),
            "localhost".into(),
        ])
    })
    .unwrap()
    .webhook
    .unwrap();
    assert_eq!(
        w.dns_names,
        ["trellis-control.trellis-system.svc", "localhost"]
    );
}

#[test]
fn webhook_bad_settings_are_named() {
    for (edit, field) in [
        (
            Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec!["*.svc".into()]))
                as Box<dyn FnOnce(&mut ControlFile)>,
            "webhook_dns_names",
        ),
        (
            Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec!["a b".into()])),
            "webhook_dns_names",
        ),
        (
            Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec![String::new()])),
            "webhook_dns_names",
        ),
        (
            Box::new(|f: &mut ControlFile| f.sidecar_image = Some("a b".into())),
            "sidecar_image",
        ),
        (
            Box::new(|f: &mut ControlFile| f.sidecar_control_plane = Some("no-port".into())),
            "sidecar_control_plane",
        ),
        (
            Box::new(|f: &mut ControlFile| f.sidecar_control_plane = Some("h:0".into())),
            "sidecar_control_plane",
        ),
        (
            Box::new(|f: &mut ControlFile| f.no_proxy = Some(vec!["a,b".into()])),
            "no_proxy",
        ),
        (
            Box::new(|f: &mut ControlFile| f.no_proxy = Some(vec!["$(HOME)".into()])),
            "no_proxy",
        ),
    ] {
        let err = with_webhook(edit).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

#[test]
fn webhook_fields_parse_from_yaml() {
    let f = ControlFile::parse(
        "trust_domain: example.org\nwebhook_listen: 0.0.0.0:8444\nwebhook_dns_names: [a.svc, b.svc]\nsidecar_image: img:1\nsidecar_control_plane: cp:8443\nno_proxy: [.corp.example, 10.0.0.0/8, .corp.example]\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let w = ControlSettings::from_file(f).unwrap().webhook.unwrap();
    assert_eq!(w.listen.port(), 8444);
    assert_eq!(w.dns_names, ["a.svc", "b.svc"]);
    assert_eq!(w.sidecar_image, "img:1");
    assert_eq!(w.sidecar_control_plane, "cp:8443");
    assert_eq!(w.no_proxy, [".corp.example", "10.0.0.0/8"], "deduplicated");
}

#[test]
fn sidecar_default_route_is_read_then_checked_with_the_check_given() {
    let f = ControlFile::parse(
        "trust_domain: example.org\nwebhook_listen: 0.0.0.0:8444\nsidecar_default_route: \" hosts={service}.{namespace},address={service}.{namespace}:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service} \"\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let s = ControlSettings::from_file(f).unwrap();
    let mut w = s.webhook.unwrap();
    let route = w.sidecar_default_route.clone().unwrap();
    assert!(
        route.starts_with("hosts=") && route.ends_with("{service}"),
        "trimmed: {route}"
    );
    assert!(
        w.default_route_check.is_none(),
        "no check until one is given"
    );
    w.check_default_route(
        |_, td| {
            (td == "example.org")
                .then_some(())
                .ok_or_else(|| td.to_owned())
        },
        "example.org",
    )
    .unwrap();
    assert!(
        w.default_route_check.is_some(),
        "kept for the pods' annotations"
    );
    let err = w
        .clone()
        .check_default_route(
            |_, _| Err("unknown placeholder `{svc}`".into()),
            "example.org",
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sidecar_default_route") && err.contains("unknown placeholder `{svc}`"),
        "{err}"
    );
    // Empty means none.
    let w = with_webhook(|f| f.sidecar_default_route = Some("  ".into()))
        .unwrap()
        .webhook
        .unwrap();
    assert_eq!(w.sidecar_default_route, None);
}

fn with_k8s(edit: impl FnOnce(&mut ControlFile)) -> Result<ControlSettings, ConfigError> {
    let mut f = ControlFile {
        trust_domain: Some("example.org".into()),
        k8s_issuer: Some("https://kubernetes.default.svc.cluster.local".into()),
        ..Default::default()
    };
    edit(&mut f);
    ControlSettings::from_file(f)
}

#[test]
fn k8s_jwks_url_defaults_to_the_pod_files() {
    let s =
        with_k8s(|f| f.k8s_jwks_url = Some("https://kubernetes.default.svc/openid/v1/jwks".into()))
            .unwrap();
    let k8s = s.k8s.unwrap();
    assert_eq!(k8s.audience, crate::attest::settings::K8S_AUDIENCE);
    let K8sKeySource::Url {
        url,
        ca,
        token,
        refresh,
    } = k8s.jwks
    else {
        panic!("expected a URL source");
    };
    assert_eq!(
        url.as_str(),
        "https://kubernetes.default.svc/openid/v1/jwks"
    );
    assert_eq!(ca, Path::new(jwks_url::DEFAULT_CA));
    assert_eq!(token, Path::new(jwks_url::DEFAULT_TOKEN));
    assert_eq!(refresh, jwks_url::DEFAULT_REFRESH);
}

#[test]
fn k8s_jwks_url_settings_are_checked() {
    let url = || Some("https://kubernetes.default.svc/openid/v1/jwks".to_string());
    type Edit = Box<dyn FnOnce(&mut ControlFile)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(move |f| {
                f.k8s_jwks_url = url();
                f.k8s_jwks = Some("jwks.json".into());
            }),
            "k8s_jwks_url",
            "not both",
        ),
        (
            Box::new(|f| f.k8s_jwks_url = Some("http://10.0.0.1/openid/v1/jwks".into())),
            "k8s_jwks_url",
            "https://",
        ),
        (
            Box::new(move |f| {
                f.k8s_jwks_url = url();
                f.k8s_jwks_refresh = Some(Duration::from_millis(10));
            }),
            "k8s_jwks_refresh",
            "at least 1s",
        ),
        (
            Box::new(move |f| {
                f.k8s_jwks_url = url();
                f.k8s_issuer = None;
            }),
            "k8s_issuer",
            "openid-configuration",
        ),
        (
            Box::new(|f| {
                f.k8s_jwks = Some("jwks.json".into());
                f.k8s_ca = Some("ca.crt".into());
            }),
            "k8s_ca",
            "only used with k8s_jwks_url",
        ),
        (
            Box::new(|_| {}),
            "k8s_issuer",
            "set k8s_jwks or k8s_jwks_url too",
        ),
    ];
    for (edit, field, words) in cases {
        let err = with_k8s(edit).unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
        assert!(err.contains(words), "{err}");
    }
}

#[test]
fn k8s_file_and_url_fields_parse_from_yaml() {
    let f = ControlFile::parse(
        "k8s_jwks_url: https://kubernetes.default.svc/openid/v1/jwks\n\
         k8s_ca: /ca.crt\nk8s_token: /token\nk8s_jwks_refresh: 30s\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    assert_eq!(f.k8s_jwks_refresh, Some(Duration::from_secs(30)));
    assert_eq!(f.k8s_ca.as_deref(), Some(Path::new("/ca.crt")));
    assert_eq!(f.k8s_token.as_deref(), Some(Path::new("/token")));
}

#[test]
fn listener_limits_default_and_are_checked() {
    let base = || ControlFile {
        trust_domain: Some("example.org".into()),
        ..Default::default()
    };
    let s = ControlSettings::from_file(base()).unwrap();
    assert_eq!(s.limits, Limits::default());
    assert_eq!(s.limits.sds.max_connections, 20_000);
    assert!(!s.limits.sds.rate.limit_loopback);
    // The documented defaults (docs/security.md, "Hardening").
    let d = s.limits;
    assert_eq!(d.sds.max_message_bytes, 256 * 1024);
    assert_eq!(d.sds.max_header_list_bytes, 16 * 1024);
    assert_eq!(d.sds.max_pending_resets, 20);
    assert_eq!(d.admin.max_connections, 64);
    assert_eq!(d.admin.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(d.admin.server.max_header_bytes, 16 * 1024);
    assert_eq!(d.admin.server.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(d.admin.server.max_streams_per_connection, 16);
    assert_eq!(d.admin.server.max_pending_resets, 20);
    assert_eq!(d.webhook.max_header_bytes, 64 * 1024);
    assert_eq!(d.webhook.max_connections, 256);
    assert_eq!(d.webhook.max_body_bytes, 2 * 1024 * 1024);
    assert_eq!(d.webhook.body_timeout, Duration::from_secs(10));
    assert_eq!(d.webhook.header_read_timeout, Duration::from_secs(10));
    assert_eq!(d.webhook.handshake_timeout, Duration::from_secs(10));
    assert_eq!(d.k8s.max_jwt_bytes, 8 * 1024);
    assert_eq!(d.k8s.max_jwks_bytes, 1024 * 1024);
    assert_eq!(d.k8s.jwks_fetch_timeout, Duration::from_secs(10));
    let yaml = "trust_domain: example.org\nlimits:\n  sds:\n    max_connections: 5\n    \
                handshake_timeout: 2s\n    max_streams_per_connection: 16\n    \
                rate_limit: 0.5\n    rate_burst: 3\n    rate_limit_loopback: true\n    \
                max_message_bytes: 4096\n    max_header_list_bytes: 8192\n    \
                max_pending_resets: 5\n  admin:\n    max_connections: 2\n    \
                header_read_timeout: 3s\n    max_header_bytes: 9000\n    idle_timeout: 4s\n    \
                max_streams_per_connection: 3\n    max_pending_resets: 4\n  webhook:\n    \
                max_connections: 9\n    max_body_bytes: 65536\n    body_timeout: 5s\n    \
                header_read_timeout: 6s\n    handshake_timeout: 7s\n    \
                max_header_bytes: 16384\n  k8s:\n    max_jwt_bytes: 2048\n    \
                max_jwks_bytes: 4096\n    jwks_fetch_timeout: 500ms\n";
    let s =
        ControlSettings::from_file(ControlFile::parse(yaml, Path::new("c.yaml")).unwrap()).unwrap();
    let l = s.limits;
    assert_eq!(l.sds.max_connections, 5);
    assert_eq!(l.sds.handshake_timeout, Duration::from_secs(2));
    assert_eq!(l.sds.max_streams_per_connection, 16);
    assert_eq!(l.sds.rate.per_second, 0.5);
    assert_eq!(l.sds.rate.burst, 3.0);
    assert!(l.sds.rate.limit_loopback);
    assert_eq!(l.sds.max_message_bytes, 4096);
    assert_eq!(l.sds.max_header_list_bytes, 8192);
    assert_eq!(l.sds.max_pending_resets, 5);
    assert_eq!(l.admin.max_connections, 2);
    assert_eq!(l.admin.server.header_read_timeout, Duration::from_secs(3));
    assert_eq!(l.admin.server.max_header_bytes, 9000);
    assert_eq!(l.admin.server.idle_timeout, Some(Duration::from_secs(4)));
    assert_eq!(l.admin.server.max_streams_per_connection, 3);
    assert_eq!(l.admin.server.max_pending_resets, 4);
    assert_eq!(l.webhook.max_connections, 9);
    assert_eq!(l.webhook.max_body_bytes, 65536);
    assert_eq!(l.webhook.body_timeout, Duration::from_secs(5));
    assert_eq!(l.webhook.header_read_timeout, Duration::from_secs(6));
    assert_eq!(l.webhook.handshake_timeout, Duration::from_secs(7));
    assert_eq!(l.webhook.max_header_bytes, 16384);
    assert_eq!(l.k8s.max_jwt_bytes, 2048);
    assert_eq!(l.k8s.max_jwks_bytes, 4096);
    assert_eq!(l.k8s.jwks_fetch_timeout, Duration::from_millis(500));
    assert!(s.webhook.is_none());
    type Edit = Box<dyn Fn(&mut LimitsFile)>;
    let ms = Duration::from_millis;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|l| l.sds.max_connections = Some(0)),
            "sds.max_connections",
        ),
        (
            Box::new(move |l| l.sds.handshake_timeout = Some(ms(1))),
            "sds.handshake_timeout",
        ),
        (
            Box::new(|l| l.sds.max_streams_per_connection = Some(0)),
            "sds.max_streams_per_connection",
        ),
        (
            Box::new(|l| l.sds.rate_limit = Some(-1.0)),
            "sds.rate_limit",
        ),
        (Box::new(|l| l.sds.rate_burst = Some(0)), "sds.rate_burst"),
        (
            Box::new(|l| l.admin.max_connections = Some(0)),
            "admin.max_connections",
        ),
        (
            Box::new(|l| l.webhook.max_connections = Some(0)),
            "webhook.max_connections",
        ),
        (
            Box::new(|l| l.sds.max_message_bytes = Some(100)),
            "sds.max_message_bytes",
        ),
        (
            Box::new(|l| l.sds.max_header_list_bytes = Some(1024)),
            "sds.max_header_list_bytes",
        ),
        // In range, but too small for the default 8 KiB JWT.
        (
            Box::new(|l| l.sds.max_header_list_bytes = Some(8192)),
            "sds.max_header_list_bytes",
        ),
        (
            Box::new(|l| l.sds.max_pending_resets = Some(0)),
            "sds.max_pending_resets",
        ),
        (
            Box::new(|l| l.sds.max_pending_resets = Some(1_000_000)),
            "sds.max_pending_resets",
        ),
        (
            Box::new(move |l| l.admin.header_read_timeout = Some(ms(10))),
            "admin.header_read_timeout",
        ),
        (
            Box::new(|l| l.admin.max_header_bytes = Some(4096)),
            "admin.max_header_bytes",
        ),
        (
            Box::new(|l| l.admin.max_streams_per_connection = Some(0)),
            "admin.max_streams_per_connection",
        ),
        (
            Box::new(|l| l.admin.max_pending_resets = Some(0)),
            "admin.max_pending_resets",
        ),
        (
            Box::new(|l| l.webhook.max_header_bytes = Some(1024)),
            "webhook.max_header_bytes",
        ),
        (
            Box::new(|l| l.admin.idle_timeout = Some(Duration::ZERO)),
            "admin.idle_timeout",
        ),
        (
            Box::new(|l| l.webhook.max_body_bytes = Some(1 << 30)),
            "webhook.max_body_bytes",
        ),
        (
            Box::new(move |l| l.webhook.body_timeout = Some(ms(1))),
            "webhook.body_timeout",
        ),
        (
            Box::new(move |l| l.webhook.header_read_timeout = Some(ms(1))),
            "webhook.header_read_timeout",
        ),
        (
            Box::new(move |l| l.webhook.handshake_timeout = Some(ms(1))),
            "webhook.handshake_timeout",
        ),
        (
            Box::new(|l| l.k8s.max_jwt_bytes = Some(10)),
            "k8s.max_jwt_bytes",
        ),
        (
            Box::new(|l| l.k8s.max_jwt_bytes = Some(1 << 20)),
            "k8s.max_jwt_bytes",
        ),
        (
            Box::new(|l| l.k8s.max_jwks_bytes = Some(0)),
            "k8s.max_jwks_bytes",
        ),
        (
            Box::new(move |l| l.k8s.jwks_fetch_timeout = Some(ms(1))),
            "k8s.jwks_fetch_timeout",
        ),
    ];
    for (edit, field) in cases {
        let mut f = base();
        edit(&mut f.limits);
        match ControlSettings::from_file(f) {
            Err(ConfigError::Invalid {
                field: got,
                problem,
            }) => {
                assert_eq!(got, format!("limits.{field}"), "{problem}");
                assert!(!problem.is_empty());
            }
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
    // The header list check names both settings and what to do.
    let mut f = base();
    f.limits.k8s.max_jwt_bytes = Some(32 * 1024);
    let err = ControlSettings::from_file(f).unwrap_err().to_string();
    assert!(
        err.contains("limits.sds.max_header_list_bytes")
            && err.contains("limits.k8s.max_jwt_bytes"),
        "{err}"
    );
    assert!(err.contains("use at least 33856"), "{err}");
}

#[test]
fn a_flat_limit_key_names_its_new_nested_key() {
    for (old, new) in MOVED_KEYS {
        let text = format!("trust_domain: example.org\n{old}: 1\n");
        let err = ControlFile::parse(&text, Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml: line 2 column 1: ")
                && err.contains(&format!("`{old}` is now `{new}`")),
            "{old}: {err}"
        );
    }
    // Every new key exists: setting it parses (values checked elsewhere).
    for (_, new) in MOVED_KEYS {
        let mut path = new.split('.').skip(1);
        let (group, key) = (path.next().unwrap(), path.next().unwrap());
        let value = if key.ends_with("timeout") {
            "1s"
        } else if key == "rate_limit_loopback" {
            "true"
        } else {
            "1"
        };
        let text = format!("limits:\n  {group}:\n    {key}: {value}\n");
        ControlFile::parse(&text, Path::new("c.yaml")).unwrap();
    }
}

#[test]
fn defaults_apply() {
    let s = ControlSettings::from_file(ControlFile {
        trust_domain: Some("example.org".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.svid_ttl, defaults::SVID_TTL);
    assert_eq!(s.rotate_every, defaults::ROTATE_EVERY);
    assert!(s.ca.is_none() && s.k8s.is_none());
}

#[test]
fn database_defaults_to_sqlite_in_the_state_dir() {
    let s = ControlSettings::from_file(ControlFile {
        trust_domain: Some("example.org".into()),
        state_dir: Some("/srv/trellis".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.database,
        Database::Sqlite(PathBuf::from("/srv/trellis/trellis.db"))
    );
    let f = ControlFile::parse(
        "trust_domain: example.org\ndatabase: postgres://trellis:hunter2@db:5432/trellis\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    assert!(!format!("{f:?}").contains("hunter2"));
    let s = ControlSettings::from_file(f).unwrap();
    assert!(s.database.is_shared());
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn bad_database_url_names_the_flag_not_the_password() {
    let err = ControlSettings::from_file(ControlFile {
        trust_domain: Some("example.org".into()),
        database: Some("mysql://root:hunter2@db/trellis".parse().unwrap()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--database") && err.contains("TRELLIS_DATABASE"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn tls_key_exchange_defaults_to_pq_preferred_and_bad_values_are_located() {
    use trellis_identity::tls::KeyExchange;
    let parse = |text: &str| ControlFile::parse(text, Path::new("c.yaml"));
    let s = ControlSettings::from_file(parse("trust_domain: example.org\n").unwrap()).unwrap();
    assert_eq!(s.tls_key_exchange, KeyExchange::PqPreferred);
    let f = parse("trust_domain: example.org\ntls_key_exchange: classical\n").unwrap();
    assert_eq!(
        ControlSettings::from_file(f).unwrap().tls_key_exchange,
        KeyExchange::Classical
    );
    let err = parse("trust_domain: example.org\ntls_key_exchange: pq_only\n")
        .unwrap_err()
        .to_string();
    for needle in [
        "c.yaml: ",
        "tls_key_exchange",
        "pq_only",
        "line 2",
        "pq-preferred",
        "pq-only",
        "classical",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

fn settings(yaml: &str) -> Result<ControlSettings, String> {
    let f = ControlFile::parse(
        &format!("trust_domain: example.org\n{yaml}"),
        Path::new("c.yaml"),
    )
    .map_err(|e| e.to_string())?;
    ControlSettings::from_file(f).map_err(|e| e.to_string())
}

#[test]
fn pkcs11_ca_key_is_a_token_key_with_module_and_pin_file() {
    let s = settings(
        "ca_cert: /ca/intermediate.pem\nca_key: \"pkcs11:token=hsm;object=ca\"\n\
         pkcs11_module: /usr/lib/softhsm/libsofthsm2.so\npkcs11_pin_file: /run/pin\n",
    )
    .unwrap();
    let ca = s.ca.unwrap();
    assert!(matches!(&ca.key, KeyRef::Pkcs11(u) if u.object.as_deref() == Some("ca")));
    let p = s.pkcs11.unwrap();
    assert_eq!(p.sessions, crate::keys::pkcs11::DEFAULT_SESSIONS);
    assert_eq!(p.pin_file, PathBuf::from("/run/pin"));
    // A path stays a file key.
    let s = settings("ca_cert: /ca/i.pem\nca_key: /ca/i-key.pem\n").unwrap();
    assert!(matches!(s.ca.unwrap().key, KeyRef::File(_)));
}

#[test]
fn pkcs11_key_without_module_names_the_settings() {
    let err = settings("ca_cert: /ca/i.pem\nca_key: \"pkcs11:token=hsm;object=ca\"\n").unwrap_err();
    assert!(
        err.contains("pkcs11_module") && err.contains("--pkcs11-pin-file"),
        "{err}"
    );
    let err = settings("log_key: \"pkcs11:object=log\"\n").unwrap_err();
    assert!(err.contains("pkcs11_module"), "{err}");
    let err = settings("pkcs11_module: /m.so\n").unwrap_err();
    assert!(err.contains("pkcs11_pin_file"), "{err}");
    let err = settings("pkcs11_pin_file: /pin\n").unwrap_err();
    assert!(err.contains("pkcs11_module"), "{err}");
}

#[test]
fn pkcs11_refusals_name_field_and_allowed_values() {
    let base = "pkcs11_module: /m.so\npkcs11_pin_file: /pin\n";
    let err = settings(&format!("{base}pkcs11_sessions: 0\n")).unwrap_err();
    assert!(
        err.contains("pkcs11_sessions") && err.contains("1 to 256"),
        "{err}"
    );
    let err = settings(&format!("{base}log_key: /var/log.pem\n")).unwrap_err();
    assert!(err.contains("log_key") && err.contains("pkcs11:"), "{err}");
    let err = settings(&format!(
        "{base}ca_cert: /c.pem\nca_key: \"pkcs11:token=t;object=o?pin-value=1234\"\n"
    ))
    .unwrap_err();
    assert!(err.contains("ca_key") && !err.contains("1234"), "{err}");
}
