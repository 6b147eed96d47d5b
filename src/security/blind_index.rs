//! Blind indexes: keyed HMAC-SHA256 lookups over encrypted values.
//!
//! An encrypted column cannot be searched, so a lookup column stores
//! `HMAC-SHA256(index key, domain ‖ 0x00 ‖ value)` next to it. The index key
//! is derived from `SECRET_KEY`:
//! `HMAC-SHA256(key = SECRET_KEY bytes, msg = "gatehouse/blind-index/v1")`.
//! The domain (e.g. `"messages.from_number"`) keeps equal values in different
//! columns from producing equal index values.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Message that derives the index key from `SECRET_KEY`.
pub const INDEX_KEY_LABEL: &[u8] = b"gatehouse/blind-index/v1";

/// SHA-256 block size: HMAC keys up to this length are zero-padded, longer
/// ones are hashed first (RFC 2104).
const BLOCK_LEN: usize = 64;

/// Computes blind index values. Cheap to clone; `Debug` is redacted.
#[derive(Clone)]
pub struct BlindIndex {
    key: Zeroizing<[u8; 32]>,
}

impl BlindIndex {
    /// Derives the index key from `SECRET_KEY`.
    pub fn new(secret_key: &SecretString) -> Self {
        let key = hmac_sha256(secret_key.expose_secret().as_bytes(), &[INDEX_KEY_LABEL]);
        Self {
            key: Zeroizing::new(key),
        }
    }

    /// `HMAC-SHA256(index key, domain ‖ 0x00 ‖ value)`.
    ///
    /// `domain` names the column, like `"messages.from_number"`, and must not
    /// contain a NUL character. Normalize `value` (e.g. E.164 phone numbers,
    /// lower-cased emails) before calling, so equal values index equally.
    pub fn compute(&self, domain: &str, value: &[u8]) -> [u8; 32] {
        debug_assert!(!domain.contains('\0'), "blind index domain contains NUL");
        hmac_sha256(self.key.as_slice(), &[domain.as_bytes(), &[0u8], value])
    }
}

impl fmt::Debug for BlindIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndex([REDACTED])")
    }
}

/// HMAC-SHA256 over the concatenation of `parts`, for a key of any length.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // `Hmac::new` takes a block-sized key and is infallible; preparing the key
    // here exactly as RFC 2104 does avoids the (never failing) fallible
    // `new_from_slice`.
    let mut block = Zeroizing::new([0u8; BLOCK_LEN]);
    if key.len() > BLOCK_LEN {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <HmacSha256 as KeyInit>::new(&(*block).into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-secret";

    fn index(secret: &str) -> BlindIndex {
        BlindIndex::new(&SecretString::from(secret))
    }

    #[test]
    fn values_match_python_hmac() {
        // python3: ik = hmac.new(SECRET, b"gatehouse/blind-index/v1", sha256).digest()
        //          hmac.new(ik, b"messages.from_number\x00+15551234567", sha256).hexdigest()
        let idx = index(SECRET);
        assert_eq!(
            hex::encode(*idx.key),
            "38c5cd3bcc67ab927ebd1c12de47ea7c9d65349eb619634673aed8c4561a7311"
        );
        assert_eq!(
            hex::encode(idx.compute("messages.from_number", b"+15551234567")),
            "8408cb6ed855a945893e353b5f829cae80df7db5375d17bdcdaee4a0e0a1a5ec"
        );
    }

    #[test]
    fn hmac_handles_keys_longer_than_a_block() {
        // RFC 4231 test case 6.
        let out = hmac_sha256(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex::encode(out),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_index_is_deterministic() {
        let a = index(SECRET);
        let b = index(SECRET);
        assert_eq!(
            a.compute("messages.from_number", b"+15551234567"),
            b.compute("messages.from_number", b"+15551234567")
        );
        assert_eq!(
            a.compute("messages.from_number", b"+15551234567"),
            a.clone().compute("messages.from_number", b"+15551234567")
        );
    }

    #[test]
    fn the_index_is_domain_separated() {
        let idx = index(SECRET);
        assert_ne!(
            idx.compute("messages.from_number", b"+15551234567"),
            idx.compute("messages.to_number", b"+15551234567")
        );
        // The separator keeps domain/value boundaries unambiguous.
        assert_ne!(idx.compute("ab", b"c"), idx.compute("a", b"bc"));
    }

    #[test]
    fn the_index_depends_on_the_key() {
        assert_ne!(
            index(SECRET).compute("messages.from_number", b"+15551234567"),
            index("another-secret-key-of-32-characters!!")
                .compute("messages.from_number", b"+15551234567")
        );
    }

    #[test]
    fn different_values_index_differently() {
        let idx = index(SECRET);
        assert_ne!(
            idx.compute("messages.from_number", b"+15551234567"),
            idx.compute("messages.from_number", b"+15551234568")
        );
    }

    #[test]
    fn debug_is_redacted() {
        let idx = index(SECRET);
        let dbg = format!("{idx:?}");
        assert!(!dbg.contains(SECRET));
        assert!(!dbg.contains(&hex::encode(*idx.key)));
        assert_eq!(dbg, "BlindIndex([REDACTED])");
    }
}
