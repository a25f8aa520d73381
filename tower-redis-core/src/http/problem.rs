//! `application/problem+json` answers (RFC 9457).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem document (RFC 9457): `status` always, `type`, `title` and
/// `detail` when set, and any extension members.
///
/// Members are written in the byte order of their names, one JSON object,
/// no whitespace: the same bytes `serde_json` writes for a map with these
/// members.
///
/// ```
/// use http::StatusCode;
/// use tower_redis_core::http::Problem;
///
/// let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS)
///     .type_uri("https://iana.org/assignments/http-problem-types#quota-exceeded")
///     .title("Request cannot be satisfied as assigned quota has been exceeded")
///     .detail("Retry in 2 s.")
///     .extension("violated-policies", vec!["per-ip".to_owned()]);
/// let response = problem.into_response();
/// assert_eq!(response.status(), 429);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    members: BTreeMap<Cow<'static, str>, ProblemValue>,
}

/// The value of one member of a [`Problem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemValue {
    /// A JSON string.
    String(Cow<'static, str>),
    /// A JSON number.
    Number(u64),
    /// A JSON array of strings.
    Strings(Vec<String>),
}

impl From<&'static str> for ProblemValue {
    fn from(value: &'static str) -> Self {
        ProblemValue::String(Cow::Borrowed(value))
    }
}

impl From<String> for ProblemValue {
    fn from(value: String) -> Self {
        ProblemValue::String(Cow::Owned(value))
    }
}

impl From<u64> for ProblemValue {
    fn from(value: u64) -> Self {
        ProblemValue::Number(value)
    }
}

impl From<Vec<String>> for ProblemValue {
    fn from(value: Vec<String>) -> Self {
        ProblemValue::Strings(value)
    }
}

impl Problem {
    /// A problem with this HTTP status, which is also its `status` member.
    pub fn new(status: StatusCode) -> Self {
        let mut members = BTreeMap::new();
        members.insert(
            Cow::Borrowed("status"),
            ProblemValue::Number(u64::from(status.as_u16())),
        );
        Self { status, members }
    }

    /// The `type` member: a URI naming the kind of problem.
    pub fn type_uri(self, uri: impl Into<ProblemValue>) -> Self {
        self.extension("type", uri)
    }

    /// The `title` member: a short summary of the kind of problem.
    pub fn title(self, title: impl Into<ProblemValue>) -> Self {
        self.extension("title", title)
    }

    /// The `detail` member: what went wrong with this request.
    pub fn detail(self, detail: impl Into<ProblemValue>) -> Self {
        self.extension("detail", detail)
    }

    /// Any other member; a second value for a name replaces the first.
    pub fn extension(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<ProblemValue>,
    ) -> Self {
        self.members.insert(name.into(), value.into());
        self
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The document as compact JSON.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push('{');
        for (index, (name, value)) in self.members.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            write_string(&mut out, name);
            out.push(':');
            match value {
                ProblemValue::String(text) => write_string(&mut out, text),
                ProblemValue::Number(number) => {
                    let _ = write!(out, "{number}");
                }
                ProblemValue::Strings(items) => {
                    out.push('[');
                    for (index, item) in items.iter().enumerate() {
                        if index > 0 {
                            out.push(',');
                        }
                        write_string(&mut out, item);
                    }
                    out.push(']');
                }
            }
        }
        out.push('}');
        out
    }

    /// The answer: the status, `content-type: application/problem+json`
    /// and the document.
    pub fn into_response(self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(self.to_json()));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// A JSON string literal, escaped as `serde_json` escapes it: `"`, `\` and
/// the control characters below U+0020, nothing else.
fn write_string(out: &mut String, text: &str) {
    out.push('"');
    let mut plain = 0;
    for (index, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&text[plain..index]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        plain = index + 1;
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The rate limiter's 429 body, as it builds it with `serde_json`.
    #[test]
    fn quota_exceeded_body_is_byte_identical_to_the_rate_limiters() {
        let policies = vec!["per-ip".to_owned(), "per-\"user\"".to_owned()];
        let expected = json!({
            "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "detail": format!("Retry in {} s.", 2),
            "violated-policies": policies,
        })
        .to_string();
        let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS)
            .type_uri("https://iana.org/assignments/http-problem-types#quota-exceeded")
            .title("Request cannot be satisfied as assigned quota has been exceeded")
            .detail(format!("Retry in {} s.", 2))
            .extension("violated-policies", policies);
        assert_eq!(problem.to_json(), expected);
    }

    /// The rate limiter's 400 body.
    #[test]
    fn missing_key_body_is_byte_identical_to_the_rate_limiters() {
        let policy = "per-user";
        let expected = json!({
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": format!("the request does not carry what rate-limit policy \"{policy}\" counts by"),
        })
        .to_string();
        let problem = Problem::new(StatusCode::BAD_REQUEST)
            .type_uri("about:blank")
            .title("Bad Request")
            .detail(format!(
                "the request does not carry what rate-limit policy \"{policy}\" counts by"
            ));
        assert_eq!(problem.to_json(), expected);
    }

    /// The cache admin's body: status and detail only.
    #[test]
    fn admin_body_is_byte_identical_to_the_caches() {
        let status = StatusCode::NOT_FOUND;
        let detail = "no entry for this URL";
        let expected = json!({ "status": status.as_u16(), "detail": detail }).to_string();
        assert_eq!(Problem::new(status).detail(detail).to_json(), expected);
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_ascii: String = (0u8..0x80).map(char::from).collect();
        every_ascii.push_str("/ über ✓ \u{2028} 🦀");
        let problem = Problem::new(StatusCode::BAD_REQUEST)
            .detail(every_ascii.clone())
            .extension(
                "a\"b",
                vec![every_ascii.clone(), String::new(), "\\".to_owned()],
            );
        let expected = json!({
            "status": 400,
            "detail": every_ascii,
            "a\"b": [every_ascii, "", "\\"],
        })
        .to_string();
        assert_eq!(problem.to_json(), expected);
    }

    #[test]
    fn response_carries_status_media_type_and_document() {
        let response = Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
            .detail("too big")
            .extension("limit", 1024_u64)
            .extension("limit", 2048_u64)
            .into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(
            response.body(),
            r#"{"detail":"too big","limit":2048,"status":413}"#
        );
    }
}
