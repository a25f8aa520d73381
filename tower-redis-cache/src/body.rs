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
        Ranged { ranged: Ranged<B> },
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

    /// The `len` bytes of `body` that follow its first `skip` bytes. Once
    /// they are sent, the rest of a body the cache is still reading is
    /// handed to `finish` (which reads it to its end, so that the entry is
    /// stored), not dropped.
    pub(crate) fn ranged(body: Self, skip: u64, len: u64, finish: fn(Pin<Box<Self>>)) -> Self {
        Self {
            kind: Kind::Ranged {
                ranged: Ranged {
                    inner: Some(Box::pin(body)),
                    skip,
                    remaining: len,
                    finish,
                },
            },
        }
    }

    /// Whether the cache reads this body for an entry (so that dropping it
    /// would give the entry up).
    pub(crate) fn is_teed(&self) -> bool {
        match &self.kind {
            Kind::Plain { .. } => false,
            Kind::Teed { .. } => true,
            Kind::Ranged { ranged } => ranged.inner.as_ref().is_some_and(|b| b.is_teed()),
        }
    }
}

/// A byte range of another body (RFC 9110 §14): its first `skip` bytes
/// are read and dropped, the next `remaining` passed on, and the stream
/// ends there (trailers are not part of a range).
pub(crate) struct Ranged<B: Body> {
    inner: Option<Pin<Box<CacheBody<B>>>>,
    skip: u64,
    remaining: u64,
    finish: fn(Pin<Box<CacheBody<B>>>),
}

impl<B: Body> Drop for Ranged<B> {
    fn drop(&mut self) {
        // A client that read its whole range did not go away: the rest of
        // a body being stored is read to its end. One that left early
        // gives the entry up, as without a range.
        if self.remaining == 0
            && let Some(inner) = self.inner.take()
            && inner.is_teed()
        {
            (self.finish)(inner);
        }
    }
}

impl<B> Ranged<B>
where
    B: Body<Data = Bytes>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                // Shorter than announced: the response ends short, as the
                // origin's did.
                other => return other,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = data.len() as u64;
            if self.skip >= len {
                self.skip -= len;
                continue;
            }
            // Both bounds are within `data`, so they fit in usize.
            let start = usize::try_from(self.skip).unwrap_or(usize::MAX);
            let end = usize::try_from(self.skip.saturating_add(self.remaining).min(len))
                .unwrap_or(usize::MAX);
            self.skip = 0;
            self.remaining -= (end - start) as u64;
            return Poll::Ready(Some(Ok(Frame::data(data.slice(start..end)))));
        }
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Plain { body } => f.debug_tuple("CacheBody").field(body).finish(),
            Kind::Teed { .. } => f.debug_tuple("CacheBody::Teed").finish(),
            Kind::Ranged { ranged } => f
                .debug_struct("CacheBody::Ranged")
                .field("remaining", &ranged.remaining)
                .finish_non_exhaustive(),
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
            KindProj::Ranged { ranged } => ranged.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Teed { reader } => reader.is_end_stream(),
            Kind::Ranged { ranged } => ranged.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } => body.size_hint(),
            Kind::Teed { reader } => reader.size_hint(),
            Kind::Ranged { ranged } => SizeHint::with_exact(ranged.remaining),
        }
    }
}
