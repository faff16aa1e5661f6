//! What a handler returns when it does not succeed, and how failures of the SDK's calls map
//! onto it: a transient problem is retried, anything that would fail again is rejected.

use std::fmt;

use crate::bindings::switchyard::plugin::publish::PublishError;
use crate::bindings::switchyard::plugin::store::StoreError;
use crate::bindings::switchyard::plugin::types::HandlerError;

/// Why a handler did not succeed; decides what the router does with the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Transient: the router retries the event later with backoff, then dead-letters it.
    Retry(String),
    /// Permanent: the router dead-letters the event now with this reason.
    Reject(String),
}

/// The result of a handler and of the SDK's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn retry(reason: impl Into<String>) -> Self {
        Error::Retry(reason.into())
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        Error::Reject(reason.into())
    }

    /// The WIT `handler-error` this becomes.
    pub fn into_wit(self) -> HandlerError {
        match self {
            Error::Retry(reason) => HandlerError::Retry(reason),
            Error::Reject(reason) => HandlerError::Reject(reason),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Retry(reason) => write!(f, "retry: {reason}"),
            Error::Reject(reason) => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// The database being unavailable is worth a retry; any other store error would recur.
impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(why) => Error::Retry(format!("store unavailable: {why}")),
            StoreError::InvalidDocument(why) => Error::Reject(format!("invalid document: {why}")),
            StoreError::NotIndexed(why) => Error::Reject(format!("not indexed: {why}")),
            StoreError::InvalidArgument(why) => Error::Reject(format!("invalid store argument: {why}")),
        }
    }
}

/// A refused publish would be refused again.
impl From<PublishError> for Error {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Invalid(why) => Error::Reject(format!("publish refused: {why}")),
        }
    }
}
