//! The one error every port returns, sorted by what the caller should do about it: a circuit
//! breaker must tell a throttle from an outage from bad data, and a string cannot say which.

use std::error::Error;
use std::fmt;

pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// How a backend call failed, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Unreachable, timed out, or failing on its side: try again later. Enough of these in a
    /// row mean an outage.
    Unavailable,
    /// Reachable but over its capacity: try again after a backoff. A throttle alone is not an
    /// outage.
    Throttled,
    /// The request itself was refused (a missing resource, permissions, a malformed request):
    /// the same call will fail again until an operator acts.
    Rejected,
    /// Data read back cannot be decoded.
    Corrupt,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Throttled => "throttled",
            Self::Rejected => "rejected",
            Self::Corrupt => "corrupt",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call to an event source, store or bus: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{operation}: unavailable")]
    Unavailable {
        operation: String,
        #[source]
        source: BoxError,
    },
    #[error("{operation}: throttled")]
    Throttled {
        operation: String,
        #[source]
        source: BoxError,
    },
    #[error("{operation}: rejected")]
    Rejected {
        operation: String,
        #[source]
        source: BoxError,
    },
    #[error("{operation}: unreadable data")]
    Corrupt {
        operation: String,
        #[source]
        source: BoxError,
    },
}

impl BackendError {
    pub fn new(class: FailureClass, operation: impl Into<String>, source: impl Into<BoxError>) -> Self {
        let (operation, source) = (operation.into(), source.into());
        match class {
            FailureClass::Unavailable => Self::Unavailable { operation, source },
            FailureClass::Throttled => Self::Throttled { operation, source },
            FailureClass::Rejected => Self::Rejected { operation, source },
            FailureClass::Corrupt => Self::Corrupt { operation, source },
        }
    }

    pub fn unavailable(operation: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::new(FailureClass::Unavailable, operation, source)
    }

    pub fn rejected(operation: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::new(FailureClass::Rejected, operation, source)
    }

    pub fn corrupt(operation: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::new(FailureClass::Corrupt, operation, source)
    }

    pub fn class(&self) -> FailureClass {
        match self {
            Self::Unavailable { .. } => FailureClass::Unavailable,
            Self::Throttled { .. } => FailureClass::Throttled,
            Self::Rejected { .. } => FailureClass::Rejected,
            Self::Corrupt { .. } => FailureClass::Corrupt,
        }
    }

    pub fn operation(&self) -> &str {
        match self {
            Self::Unavailable { operation, .. }
            | Self::Throttled { operation, .. }
            | Self::Rejected { operation, .. }
            | Self::Corrupt { operation, .. } => operation,
        }
    }
}

/// `error: cause: cause's cause`, for one log line or one dead-letter reason: tracing's `%`
/// shows only the outermost message, which for a wrapped error says least.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Some wrappers repeat their cause in their own message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_the_operation_and_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = BackendError::unavailable("DynamoDB UpdateItem on catalog-products", io);
        assert_eq!(e.class(), FailureClass::Unavailable);
        assert_eq!(chain(&e), "DynamoDB UpdateItem on catalog-products: unavailable: connection refused");
    }

    #[test]
    fn every_class_round_trips() {
        for class in [FailureClass::Unavailable, FailureClass::Throttled, FailureClass::Rejected, FailureClass::Corrupt] {
            assert_eq!(BackendError::new(class, "op", "cause").class(), class);
        }
    }
}
