//! The answers the layer gives itself: 429 (or gRPC RESOURCE_EXHAUSTED) for
//! a denied request, 400 (or INVALID_ARGUMENT) for a request without a key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use tower_redis_core::http::Problem;

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

/// The default 429: `Retry-After` and an `application/problem+json` body.
pub(crate) fn too_many_requests(denied: &Denied) -> Response<Bytes> {
    Problem::new(StatusCode::TOO_MANY_REQUESTS)
        .type_uri(QUOTA_EXCEEDED_TYPE)
        .title("Request cannot be satisfied as assigned quota has been exceeded")
        .detail(format!(
            "Retry in {} s.",
            ceil_secs(denied.retry_after).max(1)
        ))
        .extension("violated-policies", denied.policies.clone())
        .into_response()
}

/// 400 for a request whose key a policy could not find.
pub(crate) fn missing_key(policy: &str) -> Response<Bytes> {
    Problem::new(StatusCode::BAD_REQUEST)
        .type_uri("about:blank")
        .title("Bad Request")
        .detail(format!(
            "the request does not carry what rate-limit policy \"{policy}\" counts by"
        ))
        .into_response()
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
