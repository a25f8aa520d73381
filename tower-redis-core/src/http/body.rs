//! The body of a response that went through a layer: the inner service's,
//! untouched, or a complete one the layer wrote (an answer of its own, or
//! an entry served from the cache).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body, passed through frame by frame, or
    /// a full body held in memory, sent as one data frame (none when empty).
    pub struct InnerOrFull<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> InnerOrFull<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body of these bytes.
    pub fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full { data: None },
        }
    }

    /// Whether this is the inner service's body.
    pub fn is_inner(&self) -> bool {
        matches!(self.kind, Kind::Inner { .. })
    }
}

impl<B: fmt::Debug> fmt::Debug for InnerOrFull<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { body } => f.debug_tuple("InnerOrFull::Inner").field(body).finish(),
            Kind::Full { data } => f.debug_tuple("InnerOrFull::Full").field(data).finish(),
        }
    }
}

impl<B> Body for InnerOrFull<B>
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
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    /// A body type for the tests that never use the inner side.
    type Never = StreamBody<futures_util::stream::Empty<Result<Frame<Bytes>, Infallible>>>;

    #[tokio::test]
    async fn full_is_one_data_frame_with_an_exact_size() {
        let body = InnerOrFull::<Never>::full(Bytes::from_static(b"hello"));
        assert!(!body.is_inner());
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(5));
        let mut body = std::pin::pin!(body);
        let frame = body.frame().await.expect("a frame").expect("no error");
        assert_eq!(frame.into_data().expect("data"), "hello");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn empty_bodies_end_at_once() {
        for body in [
            InnerOrFull::<Never>::empty(),
            InnerOrFull::full(Bytes::new()),
        ] {
            assert!(body.is_end_stream());
            assert_eq!(body.size_hint().exact(), Some(0));
            assert!(
                body.collect()
                    .await
                    .expect("no error")
                    .to_bytes()
                    .is_empty()
            );
        }
    }

    #[tokio::test]
    async fn inner_passes_every_frame_and_trailer_through() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"bc"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = InnerOrFull::inner(StreamBody::new(futures_util::stream::iter(frames)));
        assert!(body.is_inner());
        let collected = body.collect().await.expect("no error");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "abc");
    }
}
