//! Blind indexes: keyed HMAC-SHA256 lookups over encrypted values.
//!
//! An encrypted column cannot be searched, so a lookup column stores
//! `HMAC-SHA256(index key, domain ‖ 0x00 ‖ value)` next to it. The index key
//! is derived from `SECRET_KEY`:
//! `HMAC-SHA256(key = SECRET_KEY bytes, msg = "gatehouse/blind-index/v1")`.
//! The domain (e.g. `"messages.from_number"`) keeps equal values in different
//! columns from producing equal index values.
//!
//! That is the first form (v1), which rows written before per-tenant indexes still hold.
//! Tenant-owned values (customer phone numbers) are now indexed per tenant (v2), so the same
//! number in two tenants has unrelated index values and nobody reading the database can
//! link a customer across tenants:
//! `HMAC-SHA256(v2 key, domain ‖ 0x00 ‖ tenant id (16 bytes) ‖ value)`, with the v2 key
//! `HMAC-SHA256(key = SECRET_KEY bytes, msg = "gatehouse/blind-index/v2")`. Platform-wide
//! values (none today: users' emails are stored in clear) keep the v1 form.
//!
//! A row records the form its index was computed in (see [`BlindIndex::form`]:
//! `v2:<key id>`; NULL for v1 under an unknown key), so `gatehouse keys reindex` skips rows
//! that are already current. While `SECRET_KEY_PREVIOUS` is set, lookups try every form a
//! row may hold ([`BlindIndex::lookups`]): current v2, current v1, previous v2, previous v1.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Message that derives the index key from `SECRET_KEY`.
pub const INDEX_KEY_LABEL: &[u8] = b"gatehouse/blind-index/v1";
/// Message that derives the per-tenant (v2) index key from `SECRET_KEY`.
pub const TENANT_INDEX_KEY_LABEL: &[u8] = b"gatehouse/blind-index/v2";
/// Message that derives the non-secret id of a `SECRET_KEY` recorded with each index.
const KEY_ID_LABEL: &[u8] = b"gatehouse/blind-index/key-id/v1";
/// The form recorded for a row whose index was retired by `keys reindex` (a duplicate
/// conversation whose customer already has another one); never looked up again.
pub const RETIRED_FORM: &str = "retired";

/// SHA-256 block size: HMAC keys up to this length are zero-padded, longer
/// ones are hashed first (RFC 2104).
const BLOCK_LEN: usize = 64;

/// The keys derived from one `SECRET_KEY`.
#[derive(Clone)]
struct IndexKeys {
    /// v1: un-tenanted.
    key: Zeroizing<[u8; 32]>,
    /// v2: per tenant.
    tenant_key: Zeroizing<[u8; 32]>,
    /// `v2:<8 hex>`, the form recorded with a v2 index under this key.
    form: String,
}

impl IndexKeys {
    fn derive(secret_key: &SecretString) -> Self {
        let secret = secret_key.expose_secret().as_bytes();
        let key = hmac_sha256(secret, &[INDEX_KEY_LABEL]);
        let tenant_key = hmac_sha256(secret, &[TENANT_INDEX_KEY_LABEL]);
        let mut h = Sha256::new();
        h.update(KEY_ID_LABEL);
        h.update([0u8]);
        h.update(secret);
        let form = format!("v2:{}", hex::encode(&h.finalize()[..4]));
        Self {
            key: Zeroizing::new(key),
            tenant_key: Zeroizing::new(tenant_key),
            form,
        }
    }

    fn v1(&self, domain: &str, value: &[u8]) -> [u8; 32] {
        debug_assert!(!domain.contains('\0'), "blind index domain contains NUL");
        hmac_sha256(self.key.as_slice(), &[domain.as_bytes(), &[0u8], value])
    }

    fn v2(&self, domain: &str, tenant: Uuid, value: &[u8]) -> [u8; 32] {
        debug_assert!(!domain.contains('\0'), "blind index domain contains NUL");
        hmac_sha256(
            self.tenant_key.as_slice(),
            &[domain.as_bytes(), &[0u8], tenant.as_bytes(), value],
        )
    }
}

/// Computes blind index values. Cheap to clone; `Debug` is redacted.
#[derive(Clone)]
pub struct BlindIndex {
    current: IndexKeys,
    /// From `SECRET_KEY_PREVIOUS`: used for lookups only.
    previous: Option<IndexKeys>,
}

impl BlindIndex {
    /// Derives the index keys from `SECRET_KEY`.
    pub fn new(secret_key: &SecretString) -> Self {
        Self::with_previous(secret_key, None)
    }

    /// Derives the index keys from `SECRET_KEY` and, for lookups, `SECRET_KEY_PREVIOUS`.
    pub fn with_previous(secret_key: &SecretString, previous: Option<&SecretString>) -> Self {
        Self {
            current: IndexKeys::derive(secret_key),
            previous: previous.map(IndexKeys::derive),
        }
    }

    /// The un-tenanted (v1) form under `SECRET_KEY`:
    /// `HMAC-SHA256(index key, domain ‖ 0x00 ‖ value)`.
    ///
    /// `domain` names the column, like `"messages.from_number"`, and must not
    /// contain a NUL character. Normalize `value` (e.g. E.164 phone numbers,
    /// lower-cased emails) before calling, so equal values index equally.
    pub fn compute(&self, domain: &str, value: &[u8]) -> [u8; 32] {
        self.current.v1(domain, value)
    }

    /// The per-tenant (v2) form under `SECRET_KEY`: what new rows store and what
    /// `keys reindex` writes.
    pub fn compute_for_tenant(&self, domain: &str, tenant: Uuid, value: &[u8]) -> [u8; 32] {
        self.current.v2(domain, tenant, value)
    }

    /// The form to record next to an index from [`Self::compute_for_tenant`]:
    /// `v2:<key id>`, the key id being the first 8 hex characters of
    /// `SHA-256("gatehouse/blind-index/key-id/v1" ‖ 0x00 ‖ SECRET_KEY)` (not secret).
    pub fn form(&self) -> &str {
        &self.current.form
    }

    /// Whether `SECRET_KEY_PREVIOUS` is configured.
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// Every index value a row for this tenant and value may hold, most preferred first:
    /// current v2, current v1, then (while `SECRET_KEY_PREVIOUS` is set) previous v2 and
    /// previous v1. A lookup takes the first that exists.
    pub fn lookups(&self, domain: &str, tenant: Uuid, value: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(4);
        for keys in std::iter::once(&self.current).chain(self.previous.as_ref()) {
            out.push(keys.v2(domain, tenant, value).to_vec());
            out.push(keys.v1(domain, value).to_vec());
        }
        out
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
            hex::encode(*idx.current.key),
            "38c5cd3bcc67ab927ebd1c12de47ea7c9d65349eb619634673aed8c4561a7311"
        );
        assert_eq!(
            hex::encode(idx.compute("messages.from_number", b"+15551234567")),
            "8408cb6ed855a945893e353b5f829cae80df7db5375d17bdcdaee4a0e0a1a5ec"
        );
    }

    #[test]
    fn tenant_values_match_python_hmac() {
        // python3: k2 = hmac.new(SECRET, b"gatehouse/blind-index/v2", sha256).digest()
        //          t = uuid.UUID("00000000-0000-0000-0000-000000000001").bytes
        //          hmac.new(k2, b"conversations.customer_number\x00" + t + b"+15551234567",
        //                   sha256).hexdigest()
        let idx = index(SECRET);
        let t = Uuid::from_u128(1);
        assert_eq!(
            hex::encode(idx.compute_for_tenant(
                "conversations.customer_number",
                t,
                b"+15551234567"
            )),
            "f53b2dd16876ef11a62225e5d4d1bc311ce9bcc12f839d7ee069aabb3a911dfc"
        );
    }

    #[test]
    fn the_same_value_in_two_tenants_indexes_differently() {
        let idx = index(SECRET);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let d = "conversations.customer_number";
        assert_ne!(
            idx.compute_for_tenant(d, a, b"+15551234567"),
            idx.compute_for_tenant(d, b, b"+15551234567")
        );
        assert_eq!(
            idx.compute_for_tenant(d, a, b"+15551234567"),
            idx.compute_for_tenant(d, a, b"+15551234567")
        );
        // And neither equals the un-tenanted form.
        assert_ne!(
            idx.compute_for_tenant(d, a, b"+15551234567"),
            idx.compute(d, b"+15551234567")
        );
    }

    #[test]
    fn lookups_try_current_then_previous_in_both_forms() {
        const OTHER: &str = "another-secret-key-of-32-characters!!";
        let t = Uuid::from_u128(7);
        let d = "conversations.customer_number";
        let v = b"+15551234567";
        let old = index(OTHER);
        let rotated = BlindIndex::with_previous(
            &SecretString::from(SECRET),
            Some(&SecretString::from(OTHER)),
        );
        assert!(rotated.has_previous());
        assert!(!old.has_previous());
        assert_eq!(
            rotated.lookups(d, t, v),
            vec![
                rotated.compute_for_tenant(d, t, v).to_vec(),
                rotated.compute(d, v).to_vec(),
                old.compute_for_tenant(d, t, v).to_vec(),
                old.compute(d, v).to_vec(),
            ]
        );
        assert_eq!(index(SECRET).lookups(d, t, v).len(), 2);
        // The form names the current key, not the previous one, and reveals neither.
        assert_eq!(rotated.form(), index(SECRET).form());
        assert_ne!(rotated.form(), old.form());
        assert!(rotated.form().starts_with("v2:") && rotated.form().len() == 11);
        assert!(
            !rotated
                .form()
                .contains(&hex::encode(Sha256::digest(SECRET))[..8])
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
        assert!(!dbg.contains(&hex::encode(*idx.current.key)));
        assert!(!dbg.contains(&hex::encode(*idx.current.tenant_key)));
        assert_eq!(dbg, "BlindIndex([REDACTED])");
    }
}
