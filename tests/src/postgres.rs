//! A PostgreSQL for the replicated control-plane tests.
//!
//! `TRELLIS_TEST_POSTGRES_URL` (tests/run.sh starts a throwaway cluster and sets it) wins;
//! without it, a throwaway cluster is started here from the Debian package's binaries
//! (`/usr/lib/postgresql/*/bin`), as the `postgres` user when running as root (initdb refuses
//! root). With neither, a test skips loudly outside CI and fails under CI.
//!
//! Every test works in a fresh schema ([`TestPostgres::fresh_schema`]): tests run in
//! parallel, and "an empty database" must really be empty.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tempfile::TempDir;

use crate::{free_port, in_ci, run_with_timeout, which};

/// The variable that points tests at a running PostgreSQL (a `postgres://` URL whose user may
/// create schemas in its database).
pub const POSTGRES_URL_ENV: &str = "TRELLIS_TEST_POSTGRES_URL";

/// How long cluster setup commands may take on a loaded machine.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// A PostgreSQL server for one test.
pub struct TestPostgres {
    base_url: String,
    psql: PathBuf,
    /// A cluster this process started (stopped on drop), or `None` for the env var's.
    own: Option<OwnCluster>,
}

struct OwnCluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    /// `pg_ctl -o` options (port, socket directory, settings), to start it again.
    options: String,
    /// Declared last: removed after the server stopped.
    dir: TempDir,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let mut cmd = pg_command(&self.pg_ctl, self.as_postgres);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        if let Err(e) = run_with_timeout(cmd, SETUP_TIMEOUT) {
            eprintln!(
                "cannot stop the test PostgreSQL in {}: {e:#}",
                self.data.display()
            );
        }
    }
}

/// A schema of its own in the test database, dropped on drop.
pub struct TestSchema {
    /// A URL whose connections work in this schema (`options=-csearch_path=…`).
    pub url: String,
    /// The schema's name.
    pub name: String,
    base_url: String,
    psql: PathBuf,
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let _ = run_psql(
            &self.psql,
            &self.base_url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

impl TestSchema {
    /// Runs `sql` in this schema with `psql -At`; returns its output.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        run_psql(&self.psql, &self.url, sql)
    }
}

impl TestPostgres {
    /// The server from `TRELLIS_TEST_POSTGRES_URL`, else one started here; `None` (after a
    /// loud SKIP line) only outside CI when neither is available.
    pub fn get_or_skip(test: &str) -> anyhow::Result<Option<Self>> {
        if let Ok(url) = std::env::var(POSTGRES_URL_ENV) {
            if !url.is_empty() {
                let psql = find_bin("psql").with_context(|| {
                    format!("{POSTGRES_URL_ENV} is set but psql is not installed (apt-get install postgresql-client)")
                })?;
                return Ok(Some(TestPostgres {
                    base_url: url,
                    psql,
                    own: None,
                }));
            }
        }
        match initdb_or_skip(test) {
            Some(initdb) => Self::start_own(&initdb, None).map(Some),
            None => Ok(None),
        }
    }

    /// A cluster of its own (whatever `TRELLIS_TEST_POSTGRES_URL` says), which the test may
    /// stop and start ([`TestPostgres::stop_immediate`]); `None` (after a SKIP line) only
    /// outside CI without the PostgreSQL binaries.
    pub fn start_own_or_skip(test: &str) -> anyhow::Result<Option<Self>> {
        match initdb_or_skip(test) {
            Some(initdb) => Self::start_own(&initdb, None).map(Some),
            None => Ok(None),
        }
    }

    /// `pg_ctl stop -m immediate`: every server process exits at once, without a checkpoint
    /// and without telling clients (a crash, as far as they can tell). Only for a cluster
    /// started here.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        let own = self
            .own
            .as_ref()
            .context("not a cluster started by this test")?;
        let mut cmd = pg_command(&own.pg_ctl, own.as_postgres);
        cmd.arg("-D")
            .arg(&own.data)
            .args(["-m", "immediate", "-w", "stop"]);
        check(
            run_with_timeout(cmd, SETUP_TIMEOUT)?,
            "pg_ctl stop -m immediate",
        )
    }

    /// Starts a cluster stopped by [`TestPostgres::stop_immediate`] again, on the same port
    /// (it recovers from its WAL first).
    pub fn start_again(&self) -> anyhow::Result<()> {
        let own = self
            .own
            .as_ref()
            .context("not a cluster started by this test")?;
        let mut cmd = pg_command(&own.pg_ctl, own.as_postgres);
        cmd.arg("-D")
            .arg(&own.data)
            .arg("-l")
            .arg(own.dir.path().join("server.log"))
            .args(["-w", "-t", "90", "-o", &own.options, "start"]);
        check(run_with_timeout(cmd, SETUP_TIMEOUT)?, "pg_ctl start")
    }

    /// A cluster of its own that serves TLS with `tls` (whatever `TRELLIS_TEST_POSTGRES_URL`
    /// says); `None` (after a SKIP line) only outside CI without the PostgreSQL binaries.
    pub fn start_with_tls(test: &str, tls: &ServerTls) -> anyhow::Result<Option<Self>> {
        match initdb_or_skip(test) {
            Some(initdb) => Self::start_own(&initdb, Some(tls)).map(Some),
            None => Ok(None),
        }
    }

    fn start_own(initdb: &Path, tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        let bin = initdb.parent().context("initdb has no directory")?;
        let pg_ctl = bin.join("pg_ctl");
        let psql = find_bin("psql").context("psql not found next to initdb nor on PATH")?;
        let as_postgres = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("trellis-pg.").tempdir()?;
        let password = format!("pw{:016x}", rand_u64());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n"))?;
        let mut ssl = String::new();
        if let Some(tls) = tls {
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert, &tls.cert_pem)?;
            std::fs::write(&key, &tls.key_pem)?;
            // The server refuses a key file that others can read.
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
            ssl = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        if as_postgres {
            // initdb and the server refuse to run as root: hand the directory to `postgres`.
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(dir.path());
            check(run_with_timeout(chown, SETUP_TIMEOUT)?, "chown postgres")?;
        }
        let data = dir.path().join("data");
        let mut cmd = pg_command(initdb, as_postgres);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "trellis",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        check(run_with_timeout(cmd, SETUP_TIMEOUT)?, "initdb")?;
        let port = free_port();
        // Durability is not under test here: skip fsyncs on a busy machine.
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off{ssl}",
            dir.path().display()
        );
        let mut cmd = pg_command(&pg_ctl, as_postgres);
        cmd.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .args(["-w", "-t", "90", "-o", &options, "start"]);
        let started = run_with_timeout(cmd, SETUP_TIMEOUT)?;
        let own = OwnCluster {
            pg_ctl,
            data,
            as_postgres,
            options,
            dir,
        };
        if !started.status.success() {
            let log =
                std::fs::read_to_string(own.dir.path().join("server.log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&started.stderr)
            );
        }
        let admin = format!("postgres://trellis:{password}@127.0.0.1:{port}/postgres");
        run_psql(&psql, &admin, "CREATE DATABASE trellis")?;
        Ok(TestPostgres {
            base_url: format!("postgres://trellis:{password}@127.0.0.1:{port}/trellis"),
            psql,
            own: Some(own),
        })
    }

    /// The database URL (user, password, host, port, database).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether this process started the server (else it came from the environment).
    pub fn started_here(&self) -> bool {
        self.own.is_some()
    }

    /// A new empty schema and a URL that works in it.
    pub fn fresh_schema(&self, hint: &str) -> anyhow::Result<TestSchema> {
        let name = format!("trellis_{hint}_{:08x}", rand_u64() as u32);
        run_psql(&self.psql, &self.base_url, &format!("CREATE SCHEMA {name}"))?;
        let sep = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(TestSchema {
            url: format!("{}{sep}options=-csearch_path%3D{name}", self.base_url),
            name,
            base_url: self.base_url.clone(),
            psql: self.psql.clone(),
        })
    }
}

/// A server certificate (chain, PEM) and its key (PKCS#8 PEM) for a TLS-serving cluster.
pub struct ServerTls {
    /// The server's certificate, then any intermediates.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// `initdb`, or `None` after a SKIP line (outside CI only: under CI it panics).
fn initdb_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_bin("initdb");
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test}: no PostgreSQL under CI: tests/run.sh installs the Debian package `postgresql` and sets {POSTGRES_URL_ENV}"
        );
        eprintln!(
            "SKIP {test}: no PostgreSQL (set {POSTGRES_URL_ENV}, install the Debian package \
             `postgresql`, or run `bash tests/run.sh`)"
        );
    }
    found
}

/// `psql URL -At -c SQL`, failing on any error.
fn run_psql(psql: &Path, url: &str, sql: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(psql);
    cmd.arg(url)
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    let out = run_with_timeout(cmd, SETUP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "psql `{sql}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(out: std::process::Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `program`, run as the `postgres` user when we are root.
fn pg_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL program: the newest `/usr/lib/postgresql/<major>/bin/<name>` (where Debian
/// puts the server tools), else `<name>` on `PATH`.
fn find_bin(name: &str) -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let p = e.path().join("bin").join(name);
            p.is_file().then_some((major, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).or_else(|| which(name))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
