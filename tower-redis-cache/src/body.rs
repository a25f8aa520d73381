//! The response body: passed through, served from an entry, or streamed to
//! the client while a copy is kept for the cache.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

pin_project! {
    /// The body of a response that went through [`Cache`](crate::Cache).
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] body: B },
        Recording { #[pin] body: B, recorder: Option<Recorder> },
        Cached { data: Option<Bytes> },
    }
}

/// Copies a body up to a limit and hands the copy over when the body ends.
/// Dropped early (client gone, body error, limit passed): nothing is sent,
/// so nothing partial is stored.
pub(crate) struct Recorder {
    buffer: BytesMut,
    limit: usize,
    done: oneshot::Sender<Bytes>,
}

impl Recorder {
    pub(crate) fn new(limit: usize) -> (Self, oneshot::Receiver<Bytes>) {
        let (done, receiver) = oneshot::channel();
        (
            Self {
                buffer: BytesMut::new(),
                limit,
                done,
            },
            receiver,
        )
    }

    /// False once the copy is over the limit.
    fn push(&mut self, data: &Bytes) -> bool {
        if self.buffer.len() + data.len() > self.limit {
            return false;
        }
        self.buffer.extend_from_slice(data);
        true
    }

    fn finish(self) {
        let _ = self.done.send(self.buffer.freeze());
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
        }
    }

    pub(crate) fn cached(data: Bytes) -> Self {
        Self {
            kind: Kind::Cached {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Cached { data: None },
        }
    }
}

impl<B: Body<Data = Bytes>> CacheBody<B> {
    pub(crate) fn recording(body: B, recorder: Recorder) -> Self {
        if body.is_end_stream() {
            // An empty body: complete already.
            recorder.finish();
            return Self::passthrough(body);
        }
        Self {
            kind: Kind::Recording {
                body,
                recorder: Some(recorder),
            },
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Passthrough { body } | Kind::Recording { body, .. } => {
                f.debug_tuple("CacheBody").field(body).finish()
            }
            Kind::Cached { data } => f.debug_tuple("CacheBody::Cached").field(data).finish(),
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Cached { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Recording { mut body, recorder } => {
                let result = match body.as_mut().poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => result,
                };
                match &result {
                    Some(Ok(frame)) => match frame.data_ref() {
                        Some(data) => {
                            if recorder.as_mut().is_some_and(|r| !r.push(data)) {
                                // Too big to store: stop copying, keep streaming.
                                *recorder = None;
                            }
                            // A body that knows it is done may not be polled again.
                            if body.is_end_stream()
                                && let Some(recorder) = recorder.take()
                            {
                                recorder.finish();
                            }
                        }
                        // Trailers are not stored; neither is the response.
                        None => *recorder = None,
                    },
                    Some(Err(_)) => *recorder = None,
                    None => {
                        if let Some(recorder) = recorder.take() {
                            recorder.finish();
                        }
                    }
                }
                Poll::Ready(result)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.is_end_stream(),
            Kind::Cached { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } | Kind::Recording { body, .. } => body.size_hint(),
            Kind::Cached { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
