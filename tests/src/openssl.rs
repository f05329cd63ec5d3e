//! OpenSSL as a foreign TLS stack: `openssl s_client` against an inbound listener, and leaf
//! certificates signed by `openssl x509` for a CA made with `trellis ca init`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use trellis_identity::{certs_to_pem, key_to_pem, Svid};

use crate::{run_with_timeout, trellis_bin, wait_until, COMMAND_TIMEOUT};

/// What one `openssl s_client` run printed.
#[derive(Debug, Clone)]
pub struct SClientRun {
    /// Exit status.
    pub status: ExitStatus,
    /// stdout: session details and whatever the server sent back.
    pub stdout: String,
    /// stderr: handshake progress, verification results and TLS alerts.
    pub stderr: String,
}

impl SClientRun {
    /// The status code of the first HTTP/1.1 response the server sent, if any.
    pub fn http_status(&self) -> Option<u16> {
        let pos = self.stdout.find("HTTP/1.1 ")?;
        self.stdout[pos + 9..]
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
    }

    /// Everything it printed, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "openssl s_client exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `openssl s_client -connect <addr> -ign_eof <args…>`, writes `request` to it, and waits
/// (at most `COMMAND_TIMEOUT`) for the server to close the connection. Blocking: call it from
/// `spawn_blocking` in async tests.
pub fn s_client(
    openssl: &Path,
    addr: SocketAddr,
    args: &[String],
    request: &str,
) -> anyhow::Result<SClientRun> {
    let mut cmd = Command::new(openssl);
    cmd.args(["s_client", "-connect", &addr.to_string(), "-ign_eof"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let request = request.to_string();
    // s_client reads stdin only once its handshake is done; with -ign_eof it then keeps the
    // connection until the server closes it.
    let in_t = std::thread::spawn(move || {
        let _ = stdin.write_all(request.as_bytes());
    });
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let mut status = None;
    let waited = wait_until(COMMAND_TIMEOUT, "openssl s_client to exit", || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = in_t.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        bail!(
            "openssl s_client to {addr} did not exit within {COMMAND_TIMEOUT:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    };
    Ok(SClientRun {
        status,
        stdout,
        stderr,
    })
}

/// [`s_client`] on a blocking thread.
pub async fn s_client_async(
    openssl: &Path,
    addr: SocketAddr,
    args: Vec<String>,
    request: &str,
) -> anyhow::Result<SClientRun> {
    let openssl = openssl.to_path_buf();
    let request = request.to_string();
    tokio::task::spawn_blocking(move || s_client(&openssl, addr, &args, &request)).await?
}

/// A plain `GET path` that asks the server to close the connection after answering.
pub fn http_get_request(host: &str, path: &str, extra_headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// PEM files for a leaf certificate, its key and any intermediates.
#[derive(Debug, Clone)]
pub struct PemFiles {
    /// The leaf certificate.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
    /// Intermediates sent after the leaf, if any.
    pub intermediates: Option<PathBuf>,
}

impl PemFiles {
    /// `-cert <leaf> -key <key> [-cert_chain <intermediates>]` for s_client.
    pub fn s_client_args(&self) -> Vec<String> {
        let mut args = vec![
            "-cert".into(),
            self.cert.to_string_lossy().into_owned(),
            "-key".into(),
            self.key.to_string_lossy().into_owned(),
        ];
        if let Some(chain) = &self.intermediates {
            args.push("-cert_chain".into());
            args.push(chain.to_string_lossy().into_owned());
        }
        args
    }
}

/// Writes `svid` as `<dir>/<name>.pem` (leaf), `<dir>/<name>-key.pem` and, if the chain has
/// intermediates, `<dir>/<name>-chain.pem`.
pub fn write_svid_pem(svid: &Svid, dir: &Path, name: &str) -> anyhow::Result<PemFiles> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let (leaf, rest) = svid.chain().split_first().context("empty SVID chain")?;
    std::fs::write(&cert, certs_to_pem(std::slice::from_ref(leaf)))?;
    std::fs::write(&key, key_to_pem(svid.key()).as_bytes())?;
    let intermediates = if rest.is_empty() {
        None
    } else {
        let p = dir.join(format!("{name}-chain.pem"));
        std::fs::write(&p, certs_to_pem(rest))?;
        Some(p)
    };
    Ok(PemFiles {
        cert,
        key,
        intermediates,
    })
}

/// A CA made by `trellis ca init --out <dir>`: `root.pem`, `intermediate.pem`,
/// `intermediate-key.pem`, `bundle.pem`.
#[derive(Debug, Clone)]
pub struct InitCa {
    /// The output directory.
    pub dir: PathBuf,
}

impl InitCa {
    /// Runs `trellis ca init --trust-domain <td> --out <dir>`.
    pub fn create(trust_domain: &str, dir: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["ca", "init", "--trust-domain", trust_domain, "--out"])
            .arg(dir);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "trellis ca init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(InitCa {
            dir: dir.to_path_buf(),
        })
    }

    /// The intermediate's certificate.
    pub fn intermediate(&self) -> PathBuf {
        self.dir.join("intermediate.pem")
    }

    /// The intermediate's key.
    pub fn intermediate_key(&self) -> PathBuf {
        self.dir.join("intermediate-key.pem")
    }

    /// The trust bundle (the root).
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Signs a fresh P-256 leaf with OpenSSL: one URI SAN `uri`, clientAuth and serverAuth,
    /// valid for a day. Writes `<out_dir>/<name>.pem` and its key; the intermediate goes along.
    pub fn sign_leaf_with_openssl(
        &self,
        openssl: &Path,
        uri: &str,
        out_dir: &Path,
        name: &str,
    ) -> anyhow::Result<PemFiles> {
        let key = out_dir.join(format!("{name}-key.pem"));
        let csr = out_dir.join(format!("{name}.csr"));
        let leaf = out_dir.join(format!("{name}.pem"));
        let ext = out_dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=URI:{uri}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
            let mut cmd = Command::new(openssl);
            cmd.args(args);
            let out = run_with_timeout(cmd, Duration::from_secs(20))?;
            if !out.status.success() {
                bail!(
                    "openssl {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        run(&[
            "req".as_ref(),
            "-new".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:P-256".as_ref(),
            "-nodes".as_ref(),
            "-subj".as_ref(),
            "/O=Intruder".as_ref(),
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            csr.as_os_str(),
        ])?;
        run(&[
            "x509".as_ref(),
            "-req".as_ref(),
            "-in".as_ref(),
            csr.as_os_str(),
            "-CA".as_ref(),
            self.intermediate().as_os_str(),
            "-CAkey".as_ref(),
            self.intermediate_key().as_os_str(),
            "-set_serial".as_ref(),
            "4242".as_ref(),
            "-days".as_ref(),
            "1".as_ref(),
            "-extfile".as_ref(),
            ext.as_os_str(),
            "-out".as_ref(),
            leaf.as_os_str(),
        ])?;
        Ok(PemFiles {
            cert: leaf,
            key,
            intermediates: Some(self.intermediate()),
        })
    }
}

/// A leaf [`InitCa::sign_leaf_with_rcgen`] makes: a valid X509-SVID by default
/// ([`LeafOpts::new`]); change one field to break one rule.
#[derive(Debug, Clone)]
pub struct LeafOpts {
    /// URI SANs, in order.
    pub uris: Vec<String>,
    /// Valid only during 2020-01-01..2020-01-02 instead of around now.
    pub expired: bool,
    /// basicConstraints cA=true.
    pub is_ca: bool,
}

impl LeafOpts {
    /// One URI SAN, valid now, not a CA.
    pub fn new(uri: &str) -> Self {
        LeafOpts {
            uris: vec![uri.to_string()],
            expired: false,
            is_ca: false,
        }
    }
}

impl InitCa {
    /// Signs a leaf with the intermediate's key using rcgen, for properties `openssl x509`
    /// makes awkward (a validity window in the past, two URI SANs). Writes
    /// `<out_dir>/<name>.pem` and its key; the intermediate goes along.
    pub fn sign_leaf_with_rcgen(
        &self,
        opts: &LeafOpts,
        out_dir: &Path,
        name: &str,
    ) -> anyhow::Result<PemFiles> {
        use rcgen::{
            date_time_ymd, BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa,
            Issuer, KeyPair, KeyUsagePurpose, SanType,
        };
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.intermediate_key())?)?;
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.intermediate())?, ca_key)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = opts
            .uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
            .collect::<anyhow::Result<_>>()?;
        if opts.expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 2);
        } else {
            let now = std::time::SystemTime::now();
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + Duration::from_secs(23 * 3600)).into();
        }
        if opts.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let cert_path = out_dir.join(format!("{name}.pem"));
        let key_path = out_dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(PemFiles {
            cert: cert_path,
            key: key_path,
            intermediates: Some(self.intermediate()),
        })
    }
}
