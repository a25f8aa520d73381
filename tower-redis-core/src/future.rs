//! The response future the layers share.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of a tower-redis layer's service: the layer's decision (which
/// may await Redis), then the wrapped service's call. Boxed, because the
/// decision is an `async` block.
pub struct ResponseFuture<T, E> {
    inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
}

impl<T, E> ResponseFuture<T, E> {
    /// Wraps the layer's async logic.
    pub fn new<F>(future: F) -> Self
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// `future`, run inside `span` when the span is enabled, and as it is when
/// it is not.
///
/// A disabled span (no subscriber wants it) is still entered and left on
/// every poll by [`tracing::Instrument`]. With `tracing`'s `log` feature
/// (which axum's default features turn on) and no global subscriber, each
/// entry also checks whether to log it: on a Redis round trip's path that
/// cost about a thousand instructions a call. The layers' per-request
/// paths (each Redis operation, each request of the cache, rate limit and
/// session layers, each data cache read) go through this instead. What is
/// lost: without a subscriber, `log` no longer gets the `-> span;` lines
/// of entering these spans.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let span = tracing::debug_span!("work");
/// let answer = tower_redis_core::in_span(span, async { 42 }).await;
/// assert_eq!(answer, 42);
/// # }
/// ```
pub fn in_span<F: Future>(
    span: tracing::Span,
    future: F,
) -> futures_util::future::Either<F, tracing::instrument::Instrumented<F>> {
    use futures_util::future::Either;
    use tracing::Instrument;
    if span.is_disabled() {
        Either::Left(future)
    } else {
        Either::Right(future.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::in_span;

    /// An enabled span is the current span while the future runs; a
    /// disabled one is not entered, and the future runs all the same.
    #[tokio::test(flavor = "current_thread")]
    async fn a_future_runs_inside_its_span_when_the_span_is_enabled() {
        let current = || async { tracing::Span::current().id() };
        let disabled = tracing::debug_span!("work");
        assert!(disabled.is_disabled(), "no subscriber yet");
        assert_eq!(in_span(disabled, current()).await, None);

        let _guard = crate::testing::install_subscriber(
            tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::DEBUG),
        );
        let enabled = tracing::debug_span!("work");
        assert!(!enabled.is_disabled());
        let id = enabled.id();
        assert_eq!(in_span(enabled, current()).await, id);
        let filtered = tracing::trace_span!("detail");
        assert!(filtered.is_disabled(), "below the subscriber's level");
        assert_eq!(in_span(filtered, current()).await, None);
    }
}
