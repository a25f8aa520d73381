//! The response future the layers share.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of a tower-redis layer's service: the layer's decision (which
/// may await Redis), then the wrapped service's call. Boxed, because the
/// decision is an `async` block; an answer the layer had at once (a cache
/// hit from process memory) is held as it is, with no box.
pub struct ResponseFuture<T, E> {
    inner: Inner<T, E>,
}

enum Inner<T, E> {
    Boxed(Pin<Box<dyn Future<Output = Result<T, E>> + Send>>),
    /// Taken by the first poll.
    Ready(Option<Result<T, E>>),
}

impl<T, E> ResponseFuture<T, E> {
    /// Wraps the layer's async logic.
    pub fn new<F>(future: F) -> Self
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        Self {
            inner: Inner::Boxed(Box::pin(future)),
        }
    }

    /// An answer known when the service was called.
    ///
    /// ```
    /// # use std::future::Future;
    /// # use std::pin::pin;
    /// # use std::task::{Context, Poll, Waker};
    /// use tower_redis_core::ResponseFuture;
    ///
    /// let future = pin!(ResponseFuture::<u8, ()>::ready(Ok(7)));
    /// let mut cx = Context::from_waker(Waker::noop());
    /// assert_eq!(future.poll(&mut cx), Poll::Ready(Ok(7)));
    /// ```
    pub fn ready(answer: Result<T, E>) -> Self {
        Self {
            inner: Inner::Ready(Some(answer)),
        }
    }
}

// The answer is moved out, never pinned.
impl<T, E> Unpin for ResponseFuture<T, E> {}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            Inner::Boxed(future) => future.as_mut().poll(cx),
            Inner::Ready(answer) => Poll::Ready(
                answer
                    .take()
                    .expect("a ResponseFuture is not polled after it has answered"),
            ),
        }
    }
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
