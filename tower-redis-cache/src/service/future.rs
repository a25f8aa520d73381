//! The future of [`Cache`](super::Cache): the cache's decision, which may
//! await Redis and the origin, boxed; or an answer the cache had when it
//! was called (a hit from the near tier), held as it is.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The response future of [`Cache`](crate::Cache).
pub struct ResponseFuture<T, E> {
    inner: Inner<T, E>,
}

enum Inner<T, E> {
    Boxed(Pin<Box<dyn Future<Output = Result<T, E>> + Send>>),
    /// Taken by the first poll.
    Ready(Option<Result<T, E>>),
}

impl<T, E> ResponseFuture<T, E> {
    pub(crate) fn new<F>(future: F) -> Self
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        Self {
            inner: Inner::Boxed(Box::pin(future)),
        }
    }

    pub(crate) fn ready(answer: Result<T, E>) -> Self {
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
