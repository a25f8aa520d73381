//! A response read whole, as the cross-crate suites check it.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

/// A response with its body read into a string (lossily, for bodies that
/// are not UTF-8).
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The header fields.
    pub headers: HeaderMap,
    /// The body, decoded lossily.
    pub body: String,
}

impl Answer {
    /// Reads `response` whole. Panics when its body fails, which the test
    /// apps' bodies never do.
    pub async fn read(response: Response<Body>) -> Answer {
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => panic!("the response body failed: {error}"),
        };
        Answer::from_parts(parts.status, parts.headers, &body)
    }

    /// An answer from its parts, the body decoded lossily.
    pub fn from_parts(status: StatusCode, headers: HeaderMap, body: &[u8]) -> Answer {
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }

    /// The `Cache-Status` field, or "" without one.
    pub fn cache_status(&self) -> String {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    /// The value of the cookie `name` this response sets, if any (`None`
    /// for a removal, which sets it empty).
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let pair = v.split(';').next()?;
                let (cookie, value) = pair.split_once('=')?;
                (cookie == name && !value.is_empty()).then(|| value.to_owned())
            })
    }
}
