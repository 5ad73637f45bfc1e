//! Errors of a reconcile. Spec errors are not here: they become a `Degraded` condition
//! ([`crate::desired::SpecError`]), not a retry.

/// Why a reconcile failed; it will be retried with backoff.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("kubernetes API: {}", message(.0))]
    Kube(#[from] kube::Error),
    /// The pool has no namespace (the CRD is namespaced; only a broken client sends this).
    #[error("pool has no namespace")]
    NotNamespaced,
}

impl Error {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.is_conflict() => "conflict",
            Self::Kube(kube::Error::Api(status)) if status.is_forbidden() => "forbidden",
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "transport",
            Self::NotNamespaced => "not_namespaced",
        }
    }
}

/// A kube error in one line: the API server's code and message, not kube's `Debug` dump of the
/// whole `Status` (which is what its `Display` prints).
pub fn message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}
