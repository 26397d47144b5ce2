//! The crate's error type. Every message names the file, field, tensor or request at fault.

use std::path::{Path, PathBuf};

/// Errors returned by the library. Each variant carries enough context to point at the culprit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed or inconsistent config file (`config.json`, `generation_config.json`, ...).
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field at fault (dotted path).
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A malformed weight file or a tensor that does not match the config.
    #[error("{path}: {msg}")]
    Weights {
        /// The weight file (or directory) at fault.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Tokenizer loading or encoding failure.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Chat-template loading or rendering failure.
    #[error("chat template: {0}")]
    Template(String),
    /// A request (CLI arguments, request body, step input) that cannot be served.
    #[error("invalid request: {0}")]
    Request(String),
    /// A backend (CUDA driver, kernel launch) failure.
    #[error("backend: {0}")]
    Backend(String),
    /// A well-formed request refused for now because the engine is full (its waiting queue is at
    /// `--max-waiting`): transient, not the request's fault; retrying later can succeed.
    #[error("overloaded: {0}")]
    Overloaded(String),
}

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    /// A config error on `field` of `path`.
    pub fn config(path: impl AsRef<Path>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.as_ref().to_path_buf(), field: field.into(), msg: msg.into() }
    }
    /// A weight-file error on `path`.
    pub fn weights(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Weights { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    /// A tokenizer error on `path`.
    pub fn tokenizer(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Tokenizer { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    /// A request error.
    pub fn request(msg: impl Into<String>) -> Self {
        Error::Request(msg.into())
    }
    /// The message without the "invalid request: " prefix for a request error (which already names its field),
    /// the whole display otherwise: for wrapping in another message that names the request.
    pub fn detail(&self) -> String {
        match self {
            Error::Request(m) => m.clone(),
            other => other.to_string(),
        }
    }
}
