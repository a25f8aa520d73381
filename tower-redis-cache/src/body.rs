//! The response body: passed through, served from an entry, or read ahead
//! of the client for the cache (see `service/tee.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::service::TeeReader;

pin_project! {
    /// The body of a response that went through [`Cache`](crate::Cache).
    pub struct CacheBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Passthrough { #[pin] body: B },
        Teed { reader: TeeReader<B> },
        Cached { data: Option<Bytes> },
    }
}

impl<B: Body> CacheBody<B> {
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

    /// A body read ahead of the client for the cache.
    pub(crate) fn teed(reader: TeeReader<B>) -> Self {
        Self {
            kind: Kind::Teed { reader },
        }
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Passthrough { body } => f.debug_tuple("CacheBody").field(body).finish(),
            Kind::Teed { .. } => f.debug_tuple("CacheBody::Teed").finish(),
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
            KindProj::Teed { reader } => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Teed { reader } => reader.is_end_stream(),
            Kind::Cached { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Teed { reader } => reader.size_hint(),
            Kind::Cached { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
