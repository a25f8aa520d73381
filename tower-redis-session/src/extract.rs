//! `Session` as an axum extractor.

use axum::extract::FromRequestParts;
use http::StatusCode;
use http::request::Parts;

use crate::Session;

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no session: add tower_redis_session::SessionLayer to the router",
        ))
    }
}
