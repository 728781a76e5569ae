//! `ProductId`: the validated key of a product, used as partition key everywhere.

use std::fmt;

/// Longest id the contract accepts.
pub const MAX_PRODUCT_ID_LEN: usize = 64;

/// A product id: 1–64 characters of `[A-Za-z0-9_.:-]`, so it is safe in URLs, sled keys and logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("product id {shown:?} is invalid: {reason}")]
pub struct InvalidProductId {
    pub shown: String,
    pub reason: &'static str,
}

impl ProductId {
    pub fn parse(raw: &str) -> Result<Self, InvalidProductId> {
        let invalid = |reason| InvalidProductId { shown: raw.chars().take(80).collect(), reason };
        if raw.is_empty() {
            return Err(invalid("it is empty"));
        }
        if raw.len() > MAX_PRODUCT_ID_LEN {
            return Err(invalid("it is longer than 64 characters"));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
            return Err(invalid("only A-Z, a-z, 0-9 and _ . : - are allowed"));
        }
        // In a URL path these are the current and parent directory: a proxy or client would
        // normalise /products/.. away before it reached us.
        if raw == "." || raw == ".." {
            return Err(invalid("`.` and `..` are path segments, not ids"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProductId {
    type Error = InvalidProductId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<ProductId> for String {
    fn from(id: ProductId) -> String {
        id.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProductId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["P123", "a", "sku:123-ab_c.d", &"x".repeat(64), "...", ".a", "a.."] {
            assert!(ProductId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        for bad in ["", &"x".repeat(65), "P 1", "P/1", "P%20", "é", "P\n", ".", ".."] {
            assert!(ProductId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
