//! ECDSA signature encodings: a PKCS#11 token returns `r || s` (PKCS#11 v2.40, 2.3.1: "the
//! signature octets correspond to the concatenation of the ECDSA values r and s, both
//! represented as an octet string of equal length of at most nLen"), X.509 wants
//! `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` in DER (RFC 3279, 2.2.3).

/// `r || s` (32 bytes each) as a DER `SEQUENCE { r INTEGER, s INTEGER }`.
pub fn fixed_to_der(sig: &[u8; 64]) -> Vec<u8> {
    let (r, s) = sig.split_at(32);
    let (r, s) = (der_uint(r), der_uint(s));
    // At most 2 × (2 + 33) = 70 bytes: the short length form always fits.
    let mut out = Vec::with_capacity(2 + r.len() + s.len());
    out.push(0x30);
    out.push((r.len() + s.len()) as u8);
    out.extend_from_slice(&r);
    out.extend_from_slice(&s);
    out
}

/// A DER INTEGER for the unsigned big-endian `v`: no leading zeros, one added when the top
/// bit is set (DER integers are signed).
fn der_uint(v: &[u8]) -> Vec<u8> {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1);
    let v = &v[start..];
    let pad = v[0] & 0x80 != 0;
    let mut out = Vec::with_capacity(3 + v.len());
    out.push(0x02);
    out.push((v.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(v);
    out
}

/// A DER ECDSA P-256 signature as `r || s`; `None` if it is not one.
pub fn der_to_fixed(der: &[u8]) -> Option<[u8; 64]> {
    let body = match der {
        [0x30, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => return None,
    };
    let (r, rest) = der_int(body)?;
    let (s, rest) = der_int(rest)?;
    if !rest.is_empty() {
        return None;
    }
    let mut out = [0u8; 64];
    out[32 - r.len()..32].copy_from_slice(r);
    out[64 - s.len()..].copy_from_slice(s);
    Some(out)
}

/// One DER INTEGER of at most 32 value bytes (after its sign byte), and what follows it.
fn der_int(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let [0x02, len, rest @ ..] = b else {
        return None;
    };
    let len = usize::from(*len);
    if len == 0 || len > rest.len() {
        return None;
    }
    let (mut v, rest) = rest.split_at(len);
    if v.len() > 1 && v[0] == 0 {
        v = &v[1..];
    }
    (v.len() <= 32).then_some((v, rest))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_high_bits_and_leading_zeros() {
        let mut sig = [0u8; 64];
        sig[0] = 0x80; // r needs a sign byte
        sig[31] = 1;
        sig[34] = 0x7f; // s has two leading zero bytes
        sig[63] = 2;
        let der = fixed_to_der(&sig);
        assert_eq!(&der[..5], &[0x30, der.len() as u8 - 2, 0x02, 33, 0x00]);
        assert_eq!(der_to_fixed(&der).unwrap(), sig);
    }

    #[test]
    fn zero_values_round_trip() {
        let sig = [0u8; 64];
        assert_eq!(der_to_fixed(&fixed_to_der(&sig)).unwrap(), sig);
    }

    #[test]
    fn rejects_malformed_der() {
        assert!(der_to_fixed(&[]).is_none());
        assert!(der_to_fixed(&[0x30, 3, 0x02, 1, 1]).is_none());
        assert!(der_to_fixed(&[0x30, 6, 0x02, 1, 1, 0x02, 1, 1, 0]).is_none());
        let mut long = vec![0x30, 38, 0x02, 34];
        long.extend([1u8; 34]);
        long.extend([0x02, 0]);
        assert!(der_to_fixed(&long).is_none());
    }
}
