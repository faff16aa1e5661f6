//! The admin API's errors: each one a status, a stable code and a message that says why.

/// An admin request that failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("a valid `Authorization: Bearer <token>` header is required")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    /// A component that compiled but does not fit the plugin world.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// Logged in full; the client sees a generic message.
    #[error("{0}")]
    Internal(String),
}
