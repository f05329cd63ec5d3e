//! The one permission rule for files holding secrets (CA keys, PKCS#11 PINs).

use std::os::unix::fs::MetadataExt as _;

/// The permission bits of a secret file (a key, a PIN) that users other than its owner may
/// read, or `None` when it is private enough. One exception, PostgreSQL's rule for its TLS key
/// ("if owned by root, require 0640 or less"): a root-owned file may be readable by its group.
/// That is how Kubernetes mounts a Secret for a non-root pod: root:<fsGroup>, defaultMode plus
/// group read.
pub(crate) fn exposed_secret_mode(meta: &std::fs::Metadata) -> Option<u32> {
    let mode = meta.mode() & 0o7777;
    let root_owned_group_read = meta.uid() == 0 && mode & 0o037 == 0;
    (mode & 0o077 != 0 && !root_owned_group_read).then_some(mode)
}

/// What is wrong with the secret file at `path` and how to fix it, if others may read it
/// (see [`exposed_secret_mode`]).
pub(crate) fn exposed_secret(meta: &std::fs::Metadata, path: &std::path::Path) -> Option<String> {
    exposed_secret_mode(meta).map(|mode| {
        format!(
            "mode {mode:04o} is readable by others; run chmod 600 {}",
            path.display()
        )
    })
}
