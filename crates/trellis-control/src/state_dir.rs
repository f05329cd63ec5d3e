//! The control plane's state directory on disk: created (or tightened to) mode 0700, and the
//! trust bundle file in it (`bundle.pem`, what sidecars and operators read) written so a
//! reader never sees half a file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use trellis_identity::TrustBundle;

/// The state directory or a file in it could not be prepared or written.
#[derive(Debug, Error)]
#[error("{path}: {problem}")]
pub struct StateDirError {
    /// The directory or file.
    pub path: PathBuf,
    /// What failed.
    pub problem: String,
}

impl StateDirError {
    /// `problem` with `path`.
    pub fn new(path: &Path, problem: impl std::fmt::Display) -> Self {
        Self {
            path: path.to_owned(),
            problem: problem.to_string(),
        }
    }
}

/// Creates the state directory 0700, or tightens an existing one.
pub fn prepare_state_dir(dir: &Path) -> Result<(), StateDirError> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StateDirError::new(dir, format!("cannot create state directory: {e}")))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| StateDirError::new(dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "state directory was accessible to others; setting 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StateDirError::new(dir, format!("cannot set mode 0700: {e}")))?;
    }
    Ok(())
}

/// Writes the bundle atomically (temp file + rename) so readers never see half a file.
pub fn write_bundle(path: &Path, bundle: &TrustBundle) -> Result<(), StateDirError> {
    write_public_pem(path, &bundle.to_pem(), "bundle")
}

/// Writes public PEM text (`what`: for messages) atomically, mode 0644: trust anchors and
/// public keys meant to be copied to whoever verifies (`bundle.pem`, `log-key.pem`).
pub fn write_public_pem(path: &Path, pem: &str, what: &str) -> Result<(), StateDirError> {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)
        .map_err(|e| StateDirError::new(&tmp, format!("cannot write {what}: {e}")))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| StateDirError::new(&tmp, e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| StateDirError::new(path, format!("cannot write {what}: {e}")))
}

/// (device, inode) of the file at `path`, if there is one: which file a path names, to tell
/// whether it is still the one a process opened.
pub(crate) fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_is_created_or_tightened_to_0700() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/b");
        prepare_state_dir(&dir).unwrap();
        let mode = |d: &Path| std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_state_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }
}
