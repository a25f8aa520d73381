//! HTTP plumbing the tower-redis layers share (feature `http`): route path
//! patterns, gRPC detection, `application/problem+json` answers and the
//! body of a response that is either the inner service's or the layer's own.
//!
//! The trusted-proxy view ([`crate::forwarding`], feature `forwarding`) is
//! built on this feature.

mod body;
mod pattern;
mod problem;

pub use body::InnerOrFull;
pub use pattern::PathPattern;
pub use problem::{PROBLEM_JSON, Problem, ProblemValue};

use http::{HeaderMap, header};

/// Whether a request speaks gRPC: its `content-type` starts with
/// `application/grpc` (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`, …).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn with_content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_is_recognised_by_content_type_prefix() {
        assert!(is_grpc(&with_content_type("application/grpc")));
        assert!(is_grpc(&with_content_type("application/grpc+proto")));
        assert!(is_grpc(&with_content_type("application/grpc-web")));
        assert!(!is_grpc(&with_content_type("application/json")));
        assert!(!is_grpc(&with_content_type("text/application/grpc")));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
