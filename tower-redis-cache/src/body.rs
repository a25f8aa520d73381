//! The response body: passed through, served from an entry, or read ahead
//! of the client for the cache (see `service/tee.rs`).
//!
//! The first two are core's [`InnerOrFull`]; the third, a body whose bytes
//! are read by the cache while they are sent on, stays here because only
//! the cache reads ahead of its client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_redis_core::http::InnerOrFull;

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
        Plain { #[pin] body: InnerOrFull<B> },
        Teed { reader: TeeReader<B> },
    }
}

impl<B: Body> CacheBody<B> {
    fn plain(body: InnerOrFull<B>) -> Self {
        Self {
            kind: Kind::Plain { body },
        }
    }

    pub(crate) fn passthrough(body: B) -> Self {
        Self::plain(InnerOrFull::inner(body))
    }

    pub(crate) fn cached(data: Bytes) -> Self {
        Self::plain(InnerOrFull::full(data))
    }

    pub(crate) fn empty() -> Self {
        Self::plain(InnerOrFull::empty())
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
            Kind::Plain { body } => f.debug_tuple("CacheBody").field(body).finish(),
            Kind::Teed { .. } => f.debug_tuple("CacheBody::Teed").finish(),
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
            KindProj::Plain { body } => body.poll_frame(cx),
            KindProj::Teed { reader } => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Teed { reader } => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } => body.size_hint(),
            Kind::Teed { reader } => reader.size_hint(),
        }
    }
}
