//! The Workload API's Unix socket: created with mode 0660 without a window in which anyone
//! else could connect, refused in a missing directory, and removed when the sidecar stops.
//!
//! Why 0660 and not 0600: in a pod the sidecar and the app containers usually run as
//! different users (the injected sidecar has its own non-root UID; the app image picks its
//! own), and what they share is the pod's group (`fsGroup`, which Kubernetes adds to every
//! container's supplementary groups and gives to files created in the shared `emptyDir`).
//! 0600 would lock out every app that does not run as the sidecar's UID; 0660 admits the
//! pod's processes and nobody else. Outside Kubernetes the same holds for the sidecar's
//! user and group. The directory is the other half of the boundary: an `emptyDir` is mounted
//! only into the pod's own containers.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// The socket's mode: owner and group read/write (connect needs write), nothing for others.
pub const SOCKET_MODE: u32 = 0o660;

/// Why the socket could not be created; each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket's directory does not exist (it is not created: a typo would otherwise
    /// serve identities where no app looks).
    #[error(
        "workload API socket {path}: directory {dir} does not exist (create it, or in \
         Kubernetes mount the emptyDir the injector adds with trellis.io/workload-api: \"true\")"
    )]
    MissingDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// Something that is not a socket is in the way; it is not removed.
    #[error("workload API socket {path}: a file that is not a socket is in the way; remove it or choose another path")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Another process serves this socket.
    #[error("workload API socket {path}: another process is serving it")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Any other OS error, with the step that failed.
    #[error("workload API socket {path}: {step}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The socket file; removed on drop if it is still the one this process created.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only our own socket: a second sidecar started on the same path after this one
        // (which replaced a stale file) must keep its socket.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with [`SOCKET_MODE`]. A stale socket left by a killed sidecar (nobody
/// answers on it) is replaced; a live one or any other file is an error.
///
/// The socket is bound inside a fresh 0700 directory next to `path`, chmod-ed, then renamed
/// into place: a `chmod` after binding at `path` itself would leave a moment in which the
/// umask's mode let anyone connect (and connections queued then are accepted later).
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let io_err = |step: &'static str| {
        let path = path.to_owned();
        move |source| SocketError::Io { path, step, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(SocketError::MissingDirectory {
            path: path.to_owned(),
            dir,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_owned(),
                    })
                }
                // Nobody listens: a socket left by a sidecar that was killed.
                Err(_) => {
                    std::fs::remove_file(path).map_err(io_err("removing a stale socket"))?;
                }
            }
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking the path")(e)),
    }

    let private = dir.join(format!(
        ".trellis-wl-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err("creating a private directory next to it"))?;
    let result = (|| {
        let staged = private.join("s");
        let listener =
            std::os::unix::net::UnixListener::bind(&staged).map_err(io_err("binding"))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_err("setting mode 0660"))?;
        std::fs::rename(&staged, path).map_err(io_err("moving it into place"))?;
        let inode = std::fs::symlink_metadata(path)
            .map_err(io_err("reading it back"))?
            .ino();
        let file = SocketFile {
            path: path.to_owned(),
            inode,
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err("setting non-blocking"))?;
        let listener = UnixListener::from_std(listener).map_err(io_err("registering it"))?;
        Ok((listener, file))
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[tokio::test]
    async fn socket_has_mode_0660_and_is_removed_on_drop() {
        let dir = tempdir();
        let path = dir.path().join("workload.sock");
        let (listener, file) = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        // Nothing else is left in the directory (the private staging directory is gone).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // It accepts at the final path.
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.unwrap();
        connected.unwrap();
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let dir = tempdir();
        let path = dir.path().join("no-such-dir/workload.sock");
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::MissingDirectory { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("no-such-dir") && text.contains("does not exist"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_refused() {
        let dir = tempdir();
        let path = dir.path().join("workload.sock");
        // A socket nobody listens on any more (its listener is closed).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (_listener, _file) = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
    }

    #[test]
    fn regular_file_is_not_removed() {
        let dir = tempdir();
        let path = dir.path().join("workload.sock");
        std::fs::write(&path, "keep me").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }
}
