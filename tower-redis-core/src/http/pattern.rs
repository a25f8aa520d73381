//! Which request paths a route or policy applies to.

/// An exact path (`/about`), or a prefix when the pattern ends in `*`
/// (`/products/*`); `*` alone matches every path.
///
/// ```
/// use tower_redis_core::http::PathPattern;
///
/// let products = PathPattern::new("/products/*");
/// assert!(products.matches("/products/42"));
/// assert!(!products.matches("/product"));
/// assert!(PathPattern::new("/about").matches("/about"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Matches this path only.
    Exact(String),
    /// Matches every path that starts with this (the pattern without its `*`).
    Prefix(String),
}

impl PathPattern {
    /// Reads a pattern: a trailing `*` makes it a prefix.
    pub fn new(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some(prefix) => PathPattern::Prefix(prefix.to_owned()),
            None => PathPattern::Exact(pattern.to_owned()),
        }
    }

    /// Whether `path` (a request's URI path) falls under the pattern.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(exact) => path == exact,
            PathPattern::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The assertions of the cache's `Route` pattern test.
    #[test]
    fn patterns() {
        assert!(PathPattern::new("*").matches("/anything"));
        assert!(PathPattern::new("/p/*").matches("/p/1"));
        assert!(!PathPattern::new("/p/*").matches("/q"));
        assert!(PathPattern::new("/about").matches("/about"));
        assert!(!PathPattern::new("/about").matches("/about/x"));
    }

    // The path assertions of the rate limiter's `Policy` pattern test.
    #[test]
    fn prefix_and_exact_patterns() {
        let api = PathPattern::new("/api/*");
        assert!(api.matches("/api/items"));
        assert!(!api.matches("/apix"));
        let login = PathPattern::new("/login");
        assert!(login.matches("/login"));
        assert!(!login.matches("/login/x"));
    }

    #[test]
    fn debug_shows_the_kind_and_the_text() {
        assert_eq!(
            format!("{:?}", PathPattern::new("/p/*")),
            r#"Prefix("/p/")"#
        );
        assert_eq!(
            format!("{:?}", PathPattern::new("/about")),
            r#"Exact("/about")"#
        );
    }
}
