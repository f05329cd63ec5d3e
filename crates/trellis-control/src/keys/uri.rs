//! PKCS#11 URIs (RFC 7512) naming a private key: `pkcs11:token=LABEL;object=LABEL` or
//! `pkcs11:token=LABEL;id=%01%02`. RFC 7512, 2.3: "pk11-path-attr" values are
//! percent-encoded; `id` is "the CKA_ID attribute" as bytes. The PIN never rides in the URI:
//! `pin-value` and `pin-source` are refused (the PIN comes from --pkcs11-pin-file), and so is
//! `module-path` (the module comes from --pkcs11-module).

use super::error::KeyError;

/// A parsed PKCS#11 URI naming one private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label (`None`: the module's only token).
    pub token: Option<String>,
    /// `object=`: the key's CKA_LABEL.
    pub object: Option<String>,
    /// `id=`: the key's CKA_ID bytes.
    pub id: Option<Vec<u8>>,
}

const SCHEME: &str = "pkcs11:";
const ALLOWED: &str =
    "token, object, id, type=private (and slot/manufacturer/model/serial, ignored)";

impl Pkcs11Uri {
    /// Whether `s` is meant as a PKCS#11 URI (scheme `pkcs11:`, case-insensitive).
    pub fn is_uri(s: &str) -> bool {
        s.get(..SCHEME.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(SCHEME))
    }

    /// Parses `pkcs11:…`; needs `object=` or `id=` so exactly one key is meant.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        // Never echo a pin-value back: the error shows the URI without its query.
        let shown = s.split('?').next().unwrap_or_default().to_owned();
        let bad = |problem: String| KeyError::BadUri {
            uri: shown.clone(),
            problem,
        };
        if !Self::is_uri(s) {
            return Err(bad("does not start with `pkcs11:`".into()));
        }
        let rest = &s[SCHEME.len()..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        // Any query attribute is refused; the first one names why.
        if let Some(attr) = query.and_then(|q| q.split('&').find(|a| !a.is_empty())) {
            let name = attr.split_once('=').map_or(attr, |(n, _)| n);
            return Err(bad(match name {
                "pin-value" | "pin-source" => {
                    "the PIN may not be in the URI (command lines and logs show it): put it \
                     in the file --pkcs11-pin-file names"
                        .into()
                }
                "module-path" | "module-name" => {
                    "give the module with --pkcs11-module, not in the URI".into()
                }
                other => format!("unsupported query attribute `{other}`"),
            }));
        }
        let mut uri = Self {
            token: None,
            object: None,
            id: None,
        };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("`{attr}` is not NAME=VALUE")))?;
            let value = percent_decode(value)
                .ok_or_else(|| bad(format!("`{name}`: bad percent-encoding")))?;
            let text = || {
                String::from_utf8(value.clone())
                    .map_err(|_| bad(format!("`{name}` is not UTF-8 text")))
            };
            match name {
                "token" => uri.token = Some(text()?),
                "object" => uri.object = Some(text()?),
                "id" => uri.id = Some(value.clone()),
                "type" => {
                    if text()? != "private" {
                        return Err(bad("type must be `private` (the signing key)".into()));
                    }
                }
                "slot-id"
                | "slot-description"
                | "slot-manufacturer"
                | "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version" => {}
                other => {
                    return Err(bad(format!(
                        "unknown attribute `{other}`; allowed: {ALLOWED}"
                    )))
                }
            }
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(bad("name the key with object=LABEL or id=%XX…".into()));
        }
        Ok(uri)
    }
}

impl std::fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("token={}", percent_encode(t.as_bytes())));
        }
        if let Some(o) = &self.object {
            parts.push(format!("object={}", percent_encode(o.as_bytes())));
        }
        if let Some(id) = &self.id {
            let hex: String = id.iter().map(|b| format!("%{b:02x}")).collect();
            parts.push(format!("id={hex}"));
        }
        write!(f, "{SCHEME}{}", parts.join(";"))
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// RFC 7512 pk11-pchar: unreserved characters and a few sub-delims stay; the rest is %XX.
fn percent_encode(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=&".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_object_and_id() {
        let u = Pkcs11Uri::parse("pkcs11:token=Trellis%20HSM;object=ca-2026;id=%01%ab").unwrap();
        assert_eq!(u.token.as_deref(), Some("Trellis HSM"));
        assert_eq!(u.object.as_deref(), Some("ca-2026"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 0xab][..]));
        assert_eq!(
            u.to_string(),
            "pkcs11:token=Trellis%20HSM;object=ca-2026;id=%01%ab"
        );
        assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn refuses_pin_in_uri_without_echoing_it() {
        let err = Pkcs11Uri::parse("pkcs11:token=t;object=o?pin-value=123456")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pkcs11-pin-file"), "{err}");
        assert!(!err.contains("123456"), "{err}");
    }

    #[test]
    fn refuses_uri_naming_no_key() {
        let err = Pkcs11Uri::parse("pkcs11:token=t").unwrap_err().to_string();
        assert!(err.contains("object=LABEL"), "{err}");
    }

    #[test]
    fn refuses_unknown_attribute_and_public_type() {
        let err = Pkcs11Uri::parse("pkcs11:tokn=t;object=o")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown attribute `tokn`"), "{err}");
        let err = Pkcs11Uri::parse("pkcs11:object=o;type=public")
            .unwrap_err()
            .to_string();
        assert!(err.contains("private"), "{err}");
        assert!(Pkcs11Uri::parse("pkcs11:object=o;id=%zz").is_err());
    }
}
