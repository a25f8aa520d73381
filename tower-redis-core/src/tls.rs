//! TLS for `rediss://`: the CA certificates a configuration may carry
//! instead of the built-in roots, and their validation.

use std::fmt;

use crate::error::ConfigError;
#[cfg(feature = "tls")]
use crate::url::RedisUrl;
use crate::url::Topology;

/// CA certificates (PEM) that `rediss://` connections trust instead of the
/// built-in roots. Public data, but long: `Debug` shows only their size.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RootCertificates(pub(crate) Vec<u8>);

impl fmt::Debug for RootCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootCertificates({} bytes of PEM)", self.0.len())
    }
}

const ROOTS_FIELD: &str = "tls_root_certificates";

#[cfg(not(feature = "tls"))]
pub(crate) fn check_tls_roots(_topology: &Topology, _pem: &[u8]) -> Result<(), ConfigError> {
    Err(ConfigError::new(
        ROOTS_FIELD,
        "is set, but this build does not include TLS",
        "enable the `tls` feature of tower-redis-core",
    ))
}

#[cfg(feature = "tls")]
pub(crate) fn check_tls_roots(topology: &Topology, pem: &[u8]) -> Result<(), ConfigError> {
    let urls: Vec<&RedisUrl> = match topology {
        Topology::Standalone(url) => vec![url],
        Topology::Cluster(nodes) => nodes.iter().collect(),
        Topology::Sentinel(sentinel) => sentinel
            .sentinels()
            .iter()
            .chain([sentinel.master_url()])
            .collect(),
    };
    if !urls.iter().any(|url| url.is_tls()) {
        return Err(ConfigError::new(
            ROOTS_FIELD,
            "is set, but no Redis URL asks for TLS",
            "use rediss:// URLs, or drop the root certificates",
        ));
    }
    // The same parsing the connections use, so a bad file fails here.
    tls_certificates(pem).map_err(|problem| ConfigError::new(ROOTS_FIELD, problem, PEM_FIX))?;
    Ok(())
}

#[cfg(feature = "tls")]
const PEM_FIX: &str = "pass the CA certificate file's contents (PEM: -----BEGIN CERTIFICATE-----…)";

/// redis-rs' form of trusted roots, after checking they hold at least one
/// certificate that parses.
#[cfg(feature = "tls")]
pub(crate) fn tls_certificates(pem: &[u8]) -> Result<redis::TlsCertificates, String> {
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    };
    if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate".to_owned());
    }
    redis::Client::build_with_tls("rediss://localhost", certificates.clone())
        .map_err(|e| format!("cannot be read ({e})"))?;
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use crate::config::RedisConfig;

    #[test]
    fn tls_root_certificates_need_tls() {
        let result = RedisConfig::builder()
            .url("redis://localhost:6379")
            .tls_root_certificates("-----BEGIN CERTIFICATE-----")
            .build();
        let err = result.unwrap_err();
        assert_eq!(err.field, "tls_root_certificates");
        if cfg!(feature = "tls") {
            assert!(err.fix.contains("rediss://"), "{err}");
        } else {
            assert!(err.fix.contains("`tls` feature"), "{err}");
        }
    }
}
