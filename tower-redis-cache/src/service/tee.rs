//! Reading a response body for the cache at the origin's pace, whatever
//! the client's.
//!
//! A body that may be stored is read by a task of its own ([`read_ahead`]):
//! it keeps a copy for the entry and queues what the client has not taken
//! yet, so the entry is stored (and the requests coalesced on it are woken,
//! and `flush()` returns) as soon as the origin has sent the body, however
//! slowly the client reads. Memory stays bounded: the copy and the queue
//! each hold at most the entry size limit. Past the limit the body is not
//! stored and the task hands the rest of the origin body to the client,
//! which then streams it with ordinary backpressure. A client that goes
//! away while the origin is still sending stops the task: the origin body
//! is dropped and nothing is stored. A client that leaves once it has the
//! whole body (hyper drops a body as soon as its `Content-Length` bytes are
//! written) does not: the body's end, when the origin has already announced
//! it, is seen before the departure.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower_redis_core::sync::lock;

/// What the reading task and the client's body share.
struct Shared<B: Body> {
    state: Mutex<State<B>>,
    /// Notified when the client's body is dropped.
    client_gone: Notify,
}

struct State<B: Body> {
    /// Read from the origin, not yet taken by the client.
    pending: BytesMut,
    trailers: Option<HeaderMap>,
    error: Option<B::Error>,
    /// The rest of the origin body, handed over when it is not stored.
    rest: Option<Pin<Box<B>>>,
    /// The origin body ended (or failed): nothing more comes after `pending`.
    ended: bool,
    waker: Option<Waker>,
}

impl<B: Body> Shared<B> {
    fn state(&self) -> MutexGuard<'_, State<B>> {
        lock(&self.state)
    }

    /// Changes the state and wakes the client.
    fn update(&self, change: impl FnOnce(&mut State<B>)) {
        let waker = {
            let mut state = self.state();
            change(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The client's side: the body it reads.
pub(crate) struct TeeReader<B: Body> {
    shared: Arc<Shared<B>>,
    /// The origin body, once handed over and no longer shared.
    rest: Option<Pin<Box<B>>>,
    /// What is left to read, as the origin announced it.
    hint: SizeHint,
}

/// The task's side: the origin body and where its frames go.
pub(crate) struct TeeWriter<B: Body> {
    shared: Arc<Shared<B>>,
    body: B,
}

/// Splits an origin body into the client's reader and the task's writer.
pub(crate) fn tee<B: Body>(body: B) -> (TeeReader<B>, TeeWriter<B>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            pending: BytesMut::new(),
            trailers: None,
            error: None,
            rest: None,
            ended: false,
            waker: None,
        }),
        client_gone: Notify::new(),
    });
    let reader = TeeReader {
        shared: Arc::clone(&shared),
        rest: None,
        hint: body.size_hint(),
    };
    (reader, TeeWriter { shared, body })
}

impl<B> TeeWriter<B>
where
    B: Body<Data = Bytes>,
{
    /// Reads the origin body to its end, passing it on to the client, and
    /// returns the whole of it when it may be stored: it ended cleanly,
    /// without trailers, within `limit` bytes, while the client was there.
    pub(crate) async fn read_ahead(self, limit: usize) -> Option<Bytes> {
        let TeeWriter { shared, body } = self;
        let mut body = Box::pin(body);
        let mut copy = BytesMut::new();
        let mut storable = true;
        loop {
            // The origin first: a body that has ended is stored even when
            // its client has already left.
            let frame = tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = shared.client_gone.notified() => return None,
            };
            match frame {
                None => {
                    shared.update(|state| state.ended = true);
                    return storable.then(|| copy.freeze());
                }
                Some(Err(error)) => {
                    shared.update(|state| {
                        state.error = Some(error);
                        state.ended = true;
                    });
                    return None;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if copy.len() + data.len() > limit => {
                        // Too big to store: the client streams the rest itself.
                        shared.update(|state| {
                            state.pending.extend_from_slice(&data);
                            state.rest = Some(body);
                        });
                        return None;
                    }
                    Ok(data) => {
                        copy.extend_from_slice(&data);
                        // The origin says nothing follows (the last bytes of
                        // a known length): the body is complete now, before
                        // the client, which may take these bytes and leave
                        // at once, is woken.
                        let last = body.is_end_stream();
                        shared.update(|state| {
                            state.pending.extend_from_slice(&data);
                            state.ended = last;
                        });
                        if last {
                            return storable.then(|| copy.freeze());
                        }
                    }
                    Err(frame) => {
                        // Trailers are passed on; a response with them is not stored.
                        storable = false;
                        if let Ok(trailers) = frame.into_trailers() {
                            shared.update(|state| match &mut state.trailers {
                                Some(earlier) => earlier.extend(trailers),
                                None => state.trailers = Some(trailers),
                            });
                        }
                    }
                },
            }
        }
    }
}

impl<B> TeeReader<B>
where
    B: Body<Data = Bytes>,
{
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(rest) = &mut self.rest {
            return rest.as_mut().poll_frame(cx);
        }
        let mut state = self.shared.state();
        if !state.pending.is_empty() {
            let data = state.pending.split().freeze();
            drop(state);
            let read = data.len() as u64;
            let mut hint = SizeHint::new();
            hint.set_lower(self.hint.lower().saturating_sub(read));
            if let Some(upper) = self.hint.upper() {
                hint.set_upper(upper.saturating_sub(read));
            }
            self.hint = hint;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(error) = state.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(trailers) = state.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(rest) = state.rest.take() {
            drop(state);
            return self.rest.insert(rest).as_mut().poll_frame(cx);
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        if let Some(rest) = &self.rest {
            return rest.is_end_stream();
        }
        let state = self.shared.state();
        state.ended && state.pending.is_empty() && state.error.is_none() && state.trailers.is_none()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match &self.rest {
            Some(rest) => rest.size_hint(),
            None => self.hint,
        }
    }
}

impl<B: Body> Drop for TeeReader<B> {
    fn drop(&mut self) {
        // A stored permit: the task sees it at its next wait, if not now.
        self.shared.client_gone.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use super::*;

    /// Frames handed out one at a time; `Pending` between them when `gaps`.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn data(chunks: &[&'static str]) -> Frames {
        Frames(
            chunks
                .iter()
                .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
                .collect(),
        )
    }

    async fn read_all<B: Body<Data = Bytes>>(mut reader: TeeReader<B>) -> (Vec<u8>, bool)
    where
        B::Error: std::fmt::Debug,
    {
        let mut out = Vec::new();
        let mut trailers = false;
        while let Some(frame) = std::future::poll_fn(|cx| reader.poll_frame(cx)).await {
            let frame = frame.unwrap();
            if frame.is_trailers() {
                trailers = true;
            }
            if let Ok(data) = frame.into_data() {
                out.extend_from_slice(&data);
            }
        }
        (out, trailers)
    }

    #[tokio::test]
    async fn the_whole_body_is_stored_before_the_client_reads_any_of_it() {
        let (reader, writer) = tee(data(&["ab", "cd", "ef"]));
        let stored = writer.read_ahead(100).await;
        assert_eq!(stored.as_deref(), Some(&b"abcdef"[..]));
        assert!(!reader.is_end_stream());
        assert_eq!(read_all(reader).await.0, b"abcdef");
    }

    #[tokio::test]
    async fn past_the_limit_nothing_is_stored_and_the_client_gets_everything() {
        let (reader, writer) = tee(data(&["ab", "cd", "ef", "gh"]));
        assert_eq!(writer.read_ahead(5).await, None);
        assert_eq!(read_all(reader).await.0, b"abcdefgh");
    }

    #[tokio::test]
    async fn trailers_reach_the_client_and_stop_the_store() {
        let mut frames = data(&["ab"]);
        frames.0.push_back(Frame::trailers(HeaderMap::new()));
        let (reader, writer) = tee(frames);
        assert_eq!(writer.read_ahead(100).await, None);
        assert_eq!(read_all(reader).await, (b"ab".to_vec(), true));
    }

    /// One chunk whose end the origin announces with it (as hyper does for
    /// the last bytes of a `Content-Length` body), while polling for the end
    /// itself waits: the client takes the chunk and leaves in between.
    struct Announced(Option<Bytes>);

    impl Body for Announced {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.take() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
    }

    #[tokio::test]
    async fn a_client_that_took_the_whole_body_and_left_still_stores_it() {
        let (mut reader, writer) = tee(Announced(Some(Bytes::from_static(b"whole"))));
        let stored = tokio::spawn(writer.read_ahead(100));
        let frame = std::future::poll_fn(|cx| reader.poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "whole");
        assert!(reader.is_end_stream());
        drop(reader);
        let stored = tokio::time::timeout(std::time::Duration::from_secs(5), stored)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.as_deref(), Some(&b"whole"[..]));
    }

    #[tokio::test]
    async fn a_client_that_left_stops_the_store() {
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let (reader, writer) = tee(body);
        drop(reader);
        assert_eq!(writer.read_ahead(100).await, None);
    }
}
