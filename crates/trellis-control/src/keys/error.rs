//! Why a signing key cannot be opened or used (its own module so `pkcs11` and `uri` do not
//! depend on their parent).

use std::path::PathBuf;

/// Why a signing key cannot be opened or used; each names the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A `pkcs11:` URI does not parse.
    #[error("`{uri}`: not a usable PKCS#11 URI: {problem}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong.
        problem: String,
    },
    /// A `pkcs11:` key was named but no module is configured.
    #[error(
        "`{uri}` names a PKCS#11 key but no PKCS#11 module is configured: pass \
         --pkcs11-module PATH and --pkcs11-pin-file PATH"
    )]
    NoModule {
        /// The URI as given.
        uri: String,
    },
    /// The PKCS#11 module cannot be loaded or initialized.
    #[error("PKCS#11 module {path}: cannot load: {reason}")]
    Module {
        /// The module path.
        path: PathBuf,
        /// The loader's or module's error.
        reason: String,
    },
    /// The PIN file cannot be read, is empty, or other users can read it.
    #[error("PKCS#11 PIN file {path}: {problem}")]
    PinFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The token refused the PIN.
    #[error(
        "PKCS#11 token `{token}` refused the PIN from {pin_file}: wrong PIN{locked}; fix the \
         file (the PIN is not logged)"
    )]
    WrongPin {
        /// The token label.
        token: String,
        /// The PIN file.
        pin_file: PathBuf,
        /// ", and the PIN is now locked" when the token says so.
        locked: &'static str,
    },
    /// No token has the label asked for.
    #[error("PKCS#11 module {module}: no token labelled `{token}`; tokens present: {present}")]
    NoToken {
        /// The module path.
        module: PathBuf,
        /// The label asked for.
        token: String,
        /// The labels found, comma-separated, or `none`.
        present: String,
    },
    /// The token holds no private key matching the URI.
    #[error(
        "`{uri}`: token `{token}` holds no private key with {what}; create it with `trellis \
         ca init --pkcs11-module … --key-label …` or fix the URI"
    )]
    NoObject {
        /// The URI.
        uri: String,
        /// The token label.
        token: String,
        /// `object=…` / `id=…` as asked.
        what: String,
    },
    /// The key exists but is not an ECDSA P-256 key with a public half to read.
    #[error("`{uri}`: {problem}")]
    Unsupported {
        /// The URI or file.
        uri: String,
        /// What is wrong.
        problem: String,
    },
    /// A token operation failed (after the bounded retries, for transient errors).
    #[error("PKCS#11 token `{token}`: {op} failed: {reason}")]
    Token {
        /// The token label.
        token: String,
        /// What was being done.
        op: &'static str,
        /// The module's error.
        reason: String,
    },
    /// An in-memory key failed to sign or parse.
    #[error("signing key: {0}")]
    Software(String),
}
