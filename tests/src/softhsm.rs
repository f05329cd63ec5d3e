//! SoftHSM2 tokens for the PKCS#11 tests: a token directory of the test's own (SoftHSM reads
//! it from `SOFTHSM2_CONF`, which each `trellis` process gets in its environment), tokens
//! made with `softhsm2-util`, and the PIN in a file as `--pkcs11-pin-file` wants it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::{run_with_timeout, trellis_bin, COMMAND_TIMEOUT};

/// Debian's `softhsm2` module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every token made here. Long and unlike anything a log prints: tests assert
/// it appears in no log, and four digits ("4711", the PIN before) can turn up there by chance
/// in timestamps, serials and fingerprints (a run failed once on it).
pub const PIN: &str = "trellis-test-pin-4711";

/// A SoftHSM2 token directory under a test's directory.
pub struct SoftHsm {
    /// The `softhsm2.conf` to pass as `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// A file holding [`PIN`].
    pub pin_file: PathBuf,
}

impl SoftHsm {
    /// Whether SoftHSM2 is installed; says so when not (the caller skips its test).
    pub fn available() -> bool {
        let ok = Path::new(MODULE).exists();
        if !ok {
            eprintln!(
                "SKIP: {MODULE} not installed (Debian package softhsm2; tests/run.sh installs it)"
            );
        }
        ok
    }

    /// A token directory in `dir` with one token, `token`, PIN [`PIN`].
    pub fn create(dir: &Path, token: &str) -> anyhow::Result<Self> {
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens)?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let pin_file = dir.join("pkcs11-pin");
        std::fs::write(&pin_file, format!("{PIN}\n"))?;
        // The control plane refuses a PIN file others can read.
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let hsm = Self { conf, pin_file };
        let mut cmd = Command::new("softhsm2-util");
        cmd.args(["--init-token", "--free", "--label", token, "--pin", PIN])
            .args(["--so-pin", "0000"])
            .env("SOFTHSM2_CONF", &hsm.conf);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT).context("softhsm2-util")?;
        if !out.status.success() {
            bail!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(hsm)
    }

    /// `SOFTHSM2_CONF` for a process that loads the module.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }

    /// `--pkcs11-module … --pkcs11-pin-file …`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            MODULE.into(),
            "--pkcs11-pin-file".into(),
            self.pin_file.display().to_string(),
        ]
    }

    /// A `trellis` command with this token directory in its environment.
    pub fn trellis(&self) -> Command {
        let mut cmd = Command::new(trellis_bin());
        cmd.env("SOFTHSM2_CONF", &self.conf);
        cmd
    }

    /// Runs `trellis <args>` with the token directory; its stdout, or its stderr as the error.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.trellis();
        cmd.args(args);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "trellis {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
