//! [`SessionService`]: puts a [`Session`] in the request, writes it after
//! the handler, and sets the cookie.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response, header};
use tower_service::Service;

use crate::id::{CookieCodec, SessionId};
use crate::layer::Shared;
use crate::session::{CookieUpdate, Session};

/// A `name=value` pair longer than this is not a session cookie (ids are a
/// few dozen bytes, signed ones about a hundred) and is skipped unread. The
/// whole line is still searched, however long another cookie makes it, so
/// a neighbour's large cookie cannot hide the session; its length is
/// bounded by the server's header limit, and the search is one pass.
const MAX_SESSION_PAIR: usize = 1024;

/// The service produced by [`SessionLayer`](crate::SessionLayer).
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SessionService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

pub use tower_redis_core::ResponseFuture;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let cookie_id = session_cookie(request.headers(), &shared);
        let had_cookie = cookie_id.is_some();
        let session = Session::new(shared.store.clone(), cookie_id, shared.max_session_bytes);
        request.extensions_mut().insert(session.clone());
        // One span per request: the store records `loaded` (found, missing),
        // `saved` (created, saved, cycled, deleted) and `save_result`.
        let span = tracing::debug_span!(
            target: "tower_redis_session",
            "session",
            cookie = had_cookie,
            loaded = tracing::field::Empty,
            saved = tracing::field::Empty,
            save_result = tracing::field::Empty,
        );
        let handled = async move {
            let mut response = inner.call(request).await?;
            let update = match session.finish().await {
                Some(update) => Some(update),
                // A persistent cookie's Max-Age rolls with use.
                None if shared.expiry.persistent => session.live_id().await.map(CookieUpdate::Set),
                None => None,
            };
            if let Some(update) = update
                && let Ok(value) = HeaderValue::from_str(&set_cookie(&shared, &update))
            {
                let headers = response.headers_mut();
                headers.append(header::SET_COOKIE, value);
                // A response carrying a session id must not be cached.
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            Ok(response)
        };
        ResponseFuture::new(tracing::Instrument::instrument(handled, span))
    }
}

/// The id in the request's session cookie, if there is a valid one.
fn session_cookie(headers: &HeaderMap, shared: &Shared) -> Option<SessionId> {
    find_session_cookie(headers, &shared.cookie_name, &shared.codec)
}

/// The first valid session id among the `name` cookies of every `Cookie`
/// line.
///
/// Each line is split into its `name=value` pairs before anything is
/// decoded: other cookies on the same line are the browser's business and
/// may hold bytes that are not text (`pref=ü`), which must not hide the
/// session cookie next to them and log the user out.
pub(crate) fn find_session_cookie(
    headers: &HeaderMap,
    name: &str,
    codec: &CookieCodec,
) -> Option<SessionId> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|line| line.as_bytes().split(|byte| *byte == b';'))
        .filter(|pair| pair.len() <= MAX_SESSION_PAIR)
        .filter_map(|pair| {
            let at = pair.iter().position(|byte| *byte == b'=')?;
            let (pair_name, value) = (pair[..at].trim_ascii_start(), &pair[at + 1..]);
            (pair_name == name.as_bytes()).then_some(value)
        })
        .filter_map(|value| std::str::from_utf8(value.trim_ascii()).ok())
        .find_map(|value| codec.decode(value.trim_matches('"')))
}

fn set_cookie(shared: &Shared, update: &CookieUpdate) -> String {
    let config = &shared.cookie;
    let value = match update {
        CookieUpdate::Set(id) => shared.codec.encode(id),
        CookieUpdate::Remove => String::new(),
    };
    let mut cookie = cookie::Cookie::build((shared.cookie_name.clone(), value))
        .path(config.path.clone())
        .secure(config.secure)
        .http_only(config.http_only)
        .same_site(config.same_site);
    if let Some(domain) = &config.domain {
        cookie = cookie.domain(domain.clone());
    }
    match update {
        CookieUpdate::Remove => cookie = cookie.max_age(cookie::time::Duration::ZERO),
        CookieUpdate::Set(_) if shared.expiry.persistent => {
            let seconds = i64::try_from(shared.expiry.idle.as_secs()).unwrap_or(i64::MAX);
            cookie = cookie.max_age(cookie::time::Duration::seconds(seconds));
        }
        CookieUpdate::Set(_) => {}
    }
    cookie.build().to_string()
}
