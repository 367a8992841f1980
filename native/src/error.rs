//! The engine's one error type. Every variant names the file, field or tensor at fault;
//! the Python bindings turn it into `upg_batch.EngineError` in exactly one place.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: field `{field}`: {message}")]
    ConfigField { path: PathBuf, field: String, message: String },

    #[error("tensor `{name}` ({path}): {message}")]
    Tensor { path: PathBuf, name: String, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{0}")]
    InvalidArgument(String),

    #[error("prompt {index}: {tokens} tokens leave no room to generate within the context of {context} tokens")]
    PromptTooLong { index: usize, tokens: usize, context: usize },

    #[error("backend `{0}` is not available: {1}")]
    Backend(String, String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EngineError::File { path: path.into(), message: message.into() }
    }

    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::ConfigField { path: path.into(), field: field.into(), message: message.into() }
    }

    pub fn tensor(path: impl Into<PathBuf>, name: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::Tensor { path: path.into(), name: name.into(), message: message.into() }
    }
}

/// The message of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
    msg.unwrap_or_else(|| "(no message)".into())
}
