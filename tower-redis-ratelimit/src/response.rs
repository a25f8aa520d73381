//! The answers the layer gives itself: 429 (or gRPC RESOURCE_EXHAUSTED) for
//! a denied request, 400 (or INVALID_ARGUMENT) for a request without a key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::headers::ceil_secs;
use crate::limiter::DecisionSource;

/// The problem type of draft-ietf-httpapi-ratelimit-headers.
pub const QUOTA_EXCEEDED_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// What the layer knows about a denied request, for a custom response.
#[derive(Debug, Clone)]
pub struct Denied {
    /// The names of the policies that denied it.
    pub policies: Vec<String>,
    /// When the request would be allowed.
    pub retry_after: Duration,
    /// Which mechanism denied it.
    pub source: DecisionSource,
}

/// Builds the response for a denied request (replaces the default 429).
/// `RateLimit` fields and `Retry-After` are added to it unless it sets them.
pub type DeniedResponse = Arc<dyn Fn(&Denied) -> Response<Bytes> + Send + Sync>;

/// Whether the request speaks gRPC (`content-type: application/grpc…`).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The default 429: `Retry-After` and an `application/problem+json` body.
pub(crate) fn too_many_requests(denied: &Denied) -> Response<Bytes> {
    let body = serde_json::json!({
        "type": QUOTA_EXCEEDED_TYPE,
        "title": "Request cannot be satisfied as assigned quota has been exceeded",
        "status": 429,
        "detail": format!("Retry in {} s.", ceil_secs(denied.retry_after).max(1)),
        "violated-policies": denied.policies,
    });
    problem(StatusCode::TOO_MANY_REQUESTS, &body)
}

/// 400 for a request whose key a policy could not find.
pub(crate) fn missing_key(policy: &str) -> Response<Bytes> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": format!("the request does not carry what rate-limit policy \"{policy}\" counts by"),
    });
    problem(StatusCode::BAD_REQUEST, &body)
}

fn problem(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// A trailers-only gRPC answer: HTTP 200, `grpc-status` and `grpc-message`
/// in the headers, no body.
pub(crate) fn grpc_status(code: u8, message: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(message) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        headers.insert("grpc-message", message);
    }
    response
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` as is.
fn percent_encode_grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `RESOURCE_EXHAUSTED`.
pub(crate) const GRPC_RESOURCE_EXHAUSTED: u8 = 8;
/// `INVALID_ARGUMENT`.
pub(crate) const GRPC_INVALID_ARGUMENT: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_names_the_violated_policies() {
        let response = too_many_requests(&Denied {
            policies: vec!["per-ip".to_owned()],
            retry_after: Duration::from_millis(1500),
            source: DecisionSource::Redis,
        });
        assert_eq!(response.status(), 429);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(response.body()).expect("json");
        assert_eq!(body["type"], QUOTA_EXCEEDED_TYPE);
        assert_eq!(body["violated-policies"][0], "per-ip");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode_grpc_message("50% über"), "50%25 %C3%BCber");
        let response = grpc_status(GRPC_RESOURCE_EXHAUSTED, "rate limited");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["grpc-status"], "8");
    }
}
