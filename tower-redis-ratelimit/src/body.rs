//! The response body: the inner service's, or a small one of our own for
//! 429, 400 and gRPC answers.

use tower_redis_core::http::InnerOrFull;

/// The body of a response that passed through [`RateLimit`](crate::RateLimit):
/// the wrapped service's body untouched, or one the layer wrote (core's
/// [`InnerOrFull`]).
pub type ResponseBody<B> = InnerOrFull<B>;
