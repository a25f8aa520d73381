//! The data cache's errors.

use std::time::Duration;

use super::codec::CodecError;

/// A key the data cache cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidKey {
    /// The key is empty.
    #[error("a data cache key is empty; use a name such as `product:42`")]
    Empty,
    /// The key is longer than [`MAX_KEY_BYTES`](super::MAX_KEY_BYTES).
    #[error("a data cache key of {0} bytes is longer than 1024; hash long keys first")]
    TooLong(usize),
}

/// Why [`DataCache::get_or_insert_with`](super::DataCache::get_or_insert_with)
/// has no value to give. With a fail-safe window and an expired value in
/// it, factory failures and timeouts give that value instead.
#[derive(Debug, thiserror::Error)]
pub enum DataError<E> {
    /// The key cannot be used.
    #[error(transparent)]
    InvalidKey(#[from] InvalidKey),
    /// The factory failed.
    #[error("the factory failed: {0}")]
    Factory(E),
    /// The factory did not finish within the hard timeout (it goes on in
    /// the background and its value is stored when it finishes).
    #[error("the factory did not finish within {0:?}")]
    Timeout(Duration),
    /// The factory panicked. Other callers waiting for the same key are
    /// not affected: one of them runs its own factory.
    #[error("the factory panicked")]
    Panicked,
}

impl<E> DataError<E> {
    /// The factory's own error, if that is what this is.
    pub fn into_factory(self) -> Option<E> {
        match self {
            Self::Factory(error) => Some(error),
            _ => None,
        }
    }
}

/// Why [`DataCache::insert`](super::DataCache::insert) did not store a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The key cannot be used.
    #[error(transparent)]
    InvalidKey(#[from] InvalidKey),
    /// The codec refused the value.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The encoded value is larger than the cache's limit.
    #[error("an encoded value of {bytes} bytes is over the limit of {limit}")]
    TooLarge {
        /// The encoded size.
        bytes: usize,
        /// [`DataCacheBuilder::max_value_bytes`](super::DataCacheBuilder::max_value_bytes).
        limit: usize,
    },
}
