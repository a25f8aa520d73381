//! How values are turned into bytes: [`Codec`], with [`Json`] the default.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Turns values into the bytes stored in Redis and back. A value that no
/// longer decodes (its type changed, the bytes are foreign) is a miss and
/// is deleted, never an error to the caller.
pub trait Codec: Send + Sync + 'static {
    /// Encodes a value.
    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a value written by [`encode`](Self::encode).
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// The default codec: `serde_json`. Readable in `redis-cli`, and tolerant
/// of added fields (with `#[serde(default)]`) across deployments.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string()))
    }
}

/// A value that could not be encoded or decoded, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data cache codec: {0}")]
pub struct CodecError(pub String);
