//! AES-256-GCM envelope and the keyring (current key + decrypt-only old keys).
//!
//! Envelope layout (stored as `BYTEA`):
//!
//! ```text
//! 0x01 (version) ‖ key id (8 bytes) ‖ nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)
//! ```
//!
//! The key id is the first 8 bytes of SHA-256 of the raw 32-byte key. The AAD
//! binds a ciphertext to its place: `"{table}.{column}:{row_id}"` in PostgreSQL (see [`aad`])
//! and `"job.{queue}:{job_id}"` for a job payload's sealed fields in Redis (see [`job_aad`]),
//! so a ciphertext moved to another row, column, table or job fails to open.
//!
//! The format is part of the wire contract: a producer seals a job's customer data with the
//! current key ([`EncryptionKey::seal`], which the enqueue client calls), gatehouse's workers
//! open it with the [`Keyring`] (current and old keys).

use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadInOut, Payload};
use aes_gcm::{Aes256Gcm, Key, KeyInit, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretString;
use secrecy::zeroize::{Zeroize as _, Zeroizing};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Envelope format version byte.
pub const ENVELOPE_VERSION: u8 = 0x01;
/// Length of a raw AES-256 key.
pub const KEY_LEN: usize = 32;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of the envelope header (version ‖ key id ‖ nonce).
pub const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Smallest possible envelope (empty plaintext).
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + TAG_LEN;
/// Minimum number of distinct byte values a key must contain.
pub const MIN_DISTINCT_KEY_BYTES: usize = 16;

/// Identifies a key: the first 8 bytes of SHA-256 of the raw key.
///
/// `Display` and `Debug` both print 16 lower-case hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// Computes the id of a raw key.
    fn of(raw: &[u8; KEY_LEN]) -> Self {
        let digest = Sha256::digest(raw);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }

    /// Parses 16 hex characters (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(KeyId(id))
    }

    /// The id as 16 lower-case hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a configured key was rejected. Never carries the key itself.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not standard base64 (alphabet `A–Z a–z 0–9 + /`, `=` padding).
    #[error("must be standard base64 (alphabet A-Z a-z 0-9 + /, with = padding)")]
    NotBase64,
    /// Decodes to something other than 32 bytes.
    #[error("must decode to exactly 32 bytes (got {got})")]
    WrongLength {
        /// Number of decoded bytes.
        got: usize,
    },
    /// Too few distinct byte values.
    #[error("is low-entropy: must contain at least 16 distinct byte values (got {distinct})")]
    LowEntropy {
        /// Number of distinct byte values found.
        distinct: usize,
    },
    /// Every byte is zero.
    #[error("must not be all zero bytes")]
    AllZero,
}

/// Why an envelope could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the smallest possible envelope.
    #[error("envelope is too short")]
    TooShort,
    /// First byte is not a known envelope version.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// Sealed with a key that is neither the current nor an old key.
    #[error("envelope was sealed with unknown key {0}")]
    UnknownKey(KeyId),
    /// Authentication failed: wrong AAD, tampered data or wrong key.
    #[error("envelope failed to decrypt (wrong AAD, tampered, or wrong key)")]
    Decrypt,
}

/// A 32-byte AES-256 key. The raw bytes are zeroized on drop and never
/// appear in `Debug` output (only the key id does). The cipher (its expanded key schedule) is
/// built once and kept, wiped on drop too (aes-gcm's `zeroize`): every seal and open of a job
/// payload or a column would otherwise expand the key again.
#[derive(Clone)]
pub struct EncryptionKey {
    raw: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
    cipher: Aes256Gcm,
}

impl EncryptionKey {
    /// Parses a key from standard base64.
    ///
    /// Rules, checked in this order: standard base64 with canonical padding
    /// (surrounding ASCII whitespace is ignored), exactly 32 bytes, not all
    /// zeros, at least 16 distinct byte values. The error names the rule, never
    /// the value.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(s.trim_ascii())
                .map_err(|_| KeyError::NotBase64)?,
        );
        if decoded.len() != KEY_LEN {
            return Err(KeyError::WrongLength { got: decoded.len() });
        }
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        raw.copy_from_slice(&decoded);
        if raw.iter().all(|&b| b == 0) {
            return Err(KeyError::AllZero);
        }
        let mut seen = [false; 256];
        for &b in raw.iter() {
            seen[usize::from(b)] = true;
        }
        let distinct = seen.iter().filter(|&&s| s).count();
        if distinct < MIN_DISTINCT_KEY_BYTES {
            return Err(KeyError::LowEntropy { distinct });
        }
        Ok(Self::from_raw(raw))
    }

    /// A fresh key from the operating system's random number generator.
    ///
    /// # Panics
    /// If the operating system cannot provide randomness.
    pub fn generate() -> Self {
        loop {
            let mut raw = Zeroizing::new([0u8; KEY_LEN]);
            os_random(raw.as_mut_slice());
            // A uniformly random key virtually always has ~30 distinct bytes;
            // re-draw in the astronomically unlikely case it would fail the
            // rules that `from_base64` enforces.
            let mut seen = [false; 256];
            for &b in raw.iter() {
                seen[usize::from(b)] = true;
            }
            if seen.iter().filter(|&&s| s).count() >= MIN_DISTINCT_KEY_BYTES {
                return Self::from_raw(raw);
            }
        }
    }

    fn from_raw(raw: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let id = KeyId::of(&raw);
        let key: &Key<Aes256Gcm> = (&*raw).into();
        let cipher = Aes256Gcm::new(key);
        Self { raw, id, cipher }
    }

    /// The key as standard base64 (what `ENCRYPTION_KEY` expects).
    pub fn to_base64(&self) -> SecretString {
        SecretString::from(STANDARD.encode(self.raw.as_slice()))
    }

    /// The key id (first 8 bytes of SHA-256 of the raw key).
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Seals `plaintext` with this key and a fresh random nonce.
    ///
    /// `aad` should come from [`aad`] or [`job_aad`].
    ///
    /// # Panics
    /// If the operating system cannot provide randomness, or if the plaintext
    /// exceeds AES-GCM's limit of 64 GiB.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce_random(&mut nonce);
        // The envelope is built in one buffer and the plaintext encrypted where it lies (no
        // second buffer for the ciphertext, no copy of it).
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self.cipher().encrypt_inout_detached(
            &Nonce::from(nonce),
            aad.as_bytes(),
            (&mut out[HEADER_LEN..]).into(),
        );
        let Ok(tag) = tag else {
            // aes-gcm only refuses inputs beyond 2^36 bytes of plaintext or
            // 2^61 bytes of AAD, which no caller can produce. The plaintext copy goes first.
            out.zeroize();
            panic!("AES-GCM refused to seal: input exceeds the algorithm's size limits");
        };
        out.extend_from_slice(&tag);
        out
    }

    fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

impl PartialEq for EncryptionKey {
    /// Constant-time comparison of the raw key bytes.
    fn eq(&self, other: &Self) -> bool {
        self.raw.as_slice().ct_eq(other.raw.as_slice()).into()
    }
}

impl Eq for EncryptionKey {}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

struct KeyringInner {
    current: EncryptionKey,
    old: Vec<EncryptionKey>,
}

/// The current key (encrypts and decrypts) plus old keys (decrypt only).
/// Cheap to clone; `Debug` shows key ids only.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<KeyringInner>,
}

impl Keyring {
    /// Builds a keyring. Old keys identical to the current key, or repeated,
    /// are dropped (they add nothing).
    pub fn new(current: EncryptionKey, old: Vec<EncryptionKey>) -> Self {
        let mut kept: Vec<EncryptionKey> = Vec::with_capacity(old.len());
        for key in old {
            if key.id != current.id && !kept.iter().any(|k| k.id == key.id) {
                kept.push(key);
            }
        }
        Self {
            inner: Arc::new(KeyringInner { current, old: kept }),
        }
    }

    /// Id of the key that [`Keyring::seal`] uses.
    pub fn current_id(&self) -> KeyId {
        self.inner.current.id
    }

    /// Ids of every key, current first, then old keys in configured order.
    pub fn key_ids(&self) -> Vec<KeyId> {
        std::iter::once(self.inner.current.id)
            .chain(self.inner.old.iter().map(|k| k.id))
            .collect()
    }

    /// Whether `id` is the current key or one of the old keys.
    pub fn knows(&self, id: KeyId) -> bool {
        self.find(id).is_some()
    }

    fn find(&self, id: KeyId) -> Option<&EncryptionKey> {
        std::iter::once(&self.inner.current)
            .chain(self.inner.old.iter())
            .find(|k| k.id == id)
    }

    /// Seals `plaintext` with the current key and a fresh random nonce.
    ///
    /// `aad` should come from [`aad`] or [`job_aad`].
    ///
    /// # Panics
    /// If the operating system cannot provide randomness, or if the plaintext
    /// exceeds AES-GCM's limit of 64 GiB.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Vec<u8> {
        self.inner.current.seal(plaintext, aad)
    }

    /// The current key (what a producer seals with).
    pub fn current(&self) -> &EncryptionKey {
        &self.inner.current
    }

    /// Opens an envelope, finding its key by id among the current and old keys.
    pub fn open(&self, envelope: &[u8], aad: &str) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let (id, nonce, body) = split(envelope)?;
        let key = self.find(id).ok_or(EnvelopeError::UnknownKey(id))?;
        key.cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: body,
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| EnvelopeError::Decrypt)
    }

    /// Whether the envelope is not sealed with the current key (including
    /// envelopes too malformed to carry a key id).
    pub fn needs_reseal(&self, envelope: &[u8]) -> bool {
        envelope_key_id(envelope) != Some(self.current_id())
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.inner.current.id)
            .field(
                "old",
                &self.inner.old.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Splits a well-formed envelope into key id, nonce and ciphertext ‖ tag.
fn split(envelope: &[u8]) -> Result<(KeyId, [u8; NONCE_LEN], &[u8]), EnvelopeError> {
    let Some((&version, rest)) = envelope.split_first() else {
        return Err(EnvelopeError::TooShort);
    };
    if version != ENVELOPE_VERSION {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    if envelope.len() < MIN_ENVELOPE_LEN {
        return Err(EnvelopeError::TooShort);
    }
    let (id_bytes, rest) = rest.split_at(KEY_ID_LEN);
    let (nonce_bytes, body) = rest.split_at(NONCE_LEN);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(id_bytes);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(nonce_bytes);
    Ok((KeyId(id), nonce, body))
}

/// The key id of a well-formed envelope (known version, long enough), without
/// decrypting it.
pub fn envelope_key_id(envelope: &[u8]) -> Option<KeyId> {
    split(envelope).ok().map(|(id, _, _)| id)
}

/// The AAD binding a ciphertext to its place: `"{table}.{column}:{row_id}"`.
///
/// `table` is unqualified (no schema), `row_id` is the primary key as text
/// (UUIDs lower-case and hyphenated, as `Uuid`'s `Display` prints them).
pub fn aad(table: &str, column: &str, row_id: &str) -> String {
    format!("{table}.{column}:{row_id}")
}

/// The AAD binding a job payload's sealed fields to their job: `"job.{queue}:{job_id}"`
/// (SPEC "Customer data in Redis").
pub fn job_aad(queue: &str, job_id: &str) -> String {
    // One allocation of the right size (the enqueue hot path; `format!` costs ~10× more).
    ["job.", queue, ":", job_id].concat()
}

/// Fills a nonce from the thread's CSPRNG (`rand::rng()`: ChaCha12 seeded from the operating
/// system and reseeded from it every 64 KiB of output), as every other random token here is
/// made: a nonce only has to be unpredictable and never repeat under one key (96 random bits,
/// 2^32 seals a key at most), and a `getrandom` system call per seal was the ingress's only
/// system call beyond its socket I/O (BENCHMARKS §16). Keys still come from the operating
/// system directly ([`os_random`]).
fn nonce_random(buf: &mut [u8]) {
    use rand::RngCore as _;
    rand::rng().fill_bytes(buf);
}

/// Fills `buf` from the operating system's random number generator.
fn os_random(buf: &mut [u8]) {
    if let Err(err) = getrandom::fill(buf) {
        // Continuing without randomness would mean reused nonces or weak
        // keys; there is no safe fallback.
        panic!("the operating system random number generator failed: {err}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    /// bytes 0..32, base64 "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; SHA-256 prefix
    /// computed with python3 hashlib: 630dcd2966c43366.
    const FIXED_KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const FIXED_KEY_ID: &str = "630dcd2966c43366";

    fn ring() -> Keyring {
        Keyring::new(EncryptionKey::generate(), vec![])
    }

    #[test]
    fn a_sealed_value_opens_with_the_same_aad() {
        let ring = ring();
        let aad = aad(
            "tenants",
            "twilio_auth_token",
            "7f1c0a52-8d1e-4c7e-9a51-0d2b1f3c4e5a",
        );
        let env = ring.seal(b"secret token", &aad);
        assert_eq!(env[0], ENVELOPE_VERSION);
        assert_eq!(env.len(), MIN_ENVELOPE_LEN + b"secret token".len());
        let plain = ring.open(&env, &aad).unwrap();
        assert_eq!(plain.as_slice(), b"secret token");
    }

    #[test]
    fn an_empty_plaintext_roundtrips() {
        let ring = ring();
        let env = ring.seal(b"", "t.c:1");
        assert_eq!(env.len(), MIN_ENVELOPE_LEN);
        assert!(ring.open(&env, "t.c:1").unwrap().is_empty());
    }

    #[test]
    fn the_aad_has_the_documented_format() {
        assert_eq!(
            aad("messages", "from_number", "42"),
            "messages.from_number:42"
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_column_or_table_fails() {
        let ring = ring();
        let env = ring.seal(b"+15551234567", &aad("messages", "from_number", "1"));
        for other in [
            aad("messages", "from_number", "2"),
            aad("messages", "to_number", "1"),
            aad("conversations", "from_number", "1"),
            String::new(),
        ] {
            assert!(matches!(
                ring.open(&env, &other),
                Err(EnvelopeError::Decrypt)
            ));
        }
    }

    #[test]
    fn every_single_bit_flip_of_an_envelope_fails() {
        let ring = ring();
        let env = ring.seal(b"hello, world", "t.c:1");
        for byte in 0..env.len() {
            for bit in 0..8 {
                let mut tampered = env.clone();
                tampered[byte] ^= 1 << bit;
                assert!(
                    ring.open(&tampered, "t.c:1").is_err(),
                    "flip of byte {byte} bit {bit} was accepted"
                );
            }
        }
    }

    #[test]
    fn truncated_envelopes_fail() {
        let ring = ring();
        let env = ring.seal(b"hello", "t.c:1");
        for len in 0..env.len() {
            assert!(ring.open(&env[..len], "t.c:1").is_err());
        }
        assert!(matches!(
            ring.open(&[], "t.c:1"),
            Err(EnvelopeError::TooShort)
        ));
        assert!(matches!(
            ring.open(&env[..MIN_ENVELOPE_LEN - 1], "t.c:1"),
            Err(EnvelopeError::TooShort)
        ));
    }

    #[test]
    fn an_unknown_version_is_reported() {
        let ring = ring();
        let mut env = ring.seal(b"x", "t.c:1");
        env[0] = 2;
        assert!(matches!(
            ring.open(&env, "t.c:1"),
            Err(EnvelopeError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn old_keys_decrypt_and_the_new_key_encrypts() {
        let old_key = EncryptionKey::generate();
        let old_id = old_key.id();
        let old_ring = Keyring::new(old_key.clone(), vec![]);
        let env_old = old_ring.seal(b"legacy", "t.c:1");

        let new_key = EncryptionKey::generate();
        let new_id = new_key.id();
        let ring = Keyring::new(new_key, vec![old_key]);
        assert_eq!(ring.current_id(), new_id);
        assert_eq!(ring.key_ids(), vec![new_id, old_id]);
        assert!(ring.knows(old_id) && ring.knows(new_id));

        assert_eq!(ring.open(&env_old, "t.c:1").unwrap().as_slice(), b"legacy");
        assert!(ring.needs_reseal(&env_old));
        assert_eq!(envelope_key_id(&env_old), Some(old_id));

        let env_new = ring.seal(b"fresh", "t.c:1");
        assert_eq!(envelope_key_id(&env_new), Some(new_id));
        assert!(!ring.needs_reseal(&env_new));
        assert_eq!(ring.open(&env_new, "t.c:1").unwrap().as_slice(), b"fresh");
        // The old key alone cannot open what the new key sealed.
        assert!(matches!(
            old_ring.open(&env_new, "t.c:1"),
            Err(EnvelopeError::UnknownKey(id)) if id == new_id
        ));
    }

    #[test]
    fn an_unknown_key_id_is_reported_as_unknown_key() {
        let a = ring();
        let b = ring();
        let env = a.seal(b"x", "t.c:1");
        match b.open(&env, "t.c:1") {
            Err(EnvelopeError::UnknownKey(id)) => assert_eq!(id, a.current_id()),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        assert!(!b.knows(a.current_id()));
    }

    #[test]
    fn a_malformed_envelope_needs_reseal_and_has_no_key_id() {
        let ring = ring();
        assert!(ring.needs_reseal(b""));
        assert!(ring.needs_reseal(&[1u8; 10]));
        assert_eq!(envelope_key_id(&[1u8; 10]), None);
        assert_eq!(envelope_key_id(&[9u8; 64]), None);
    }

    #[test]
    fn the_key_id_is_the_first_8_bytes_of_sha256_of_the_key() {
        let key = EncryptionKey::from_base64(FIXED_KEY_B64).unwrap();
        assert_eq!(key.id().to_string(), FIXED_KEY_ID);
        assert_eq!(format!("{:?}", key.id()), FIXED_KEY_ID);
        assert_eq!(KeyId::from_hex(FIXED_KEY_ID), Some(key.id()));
        let ring = Keyring::new(key, vec![]);
        let env = ring.seal(b"x", "t.c:1");
        assert_eq!(hex::encode(&env[1..9]), FIXED_KEY_ID);
    }

    #[test]
    fn two_seals_use_different_nonces() {
        let ring = ring();
        let a = ring.seal(b"same", "t.c:1");
        let b = ring.seal(b"same", "t.c:1");
        assert_ne!(a[9..21], b[9..21]);
        assert_ne!(a, b);
    }

    #[test]
    fn base64_roundtrips_and_generated_keys_are_distinct() {
        let key = EncryptionKey::generate();
        let again = EncryptionKey::from_base64(key.to_base64().expose_secret()).unwrap();
        assert_eq!(key, again);
        assert_eq!(key.id(), again.id());
        assert_ne!(EncryptionKey::generate(), key);
    }

    #[test]
    fn key_rules_are_enforced_and_named() {
        let b64 = |bytes: &[u8]| STANDARD.encode(bytes);
        assert_eq!(
            EncryptionKey::from_base64("not base64!").unwrap_err(),
            KeyError::NotBase64
        );
        // Unpadded standard base64 is not what standard encoders produce.
        assert_eq!(
            EncryptionKey::from_base64(FIXED_KEY_B64.trim_end_matches('=')).unwrap_err(),
            KeyError::NotBase64
        );
        // URL-safe alphabet is not standard base64.
        let urlsafe = base64::engine::general_purpose::URL_SAFE.encode([0xfbu8; 32]);
        assert_eq!(
            EncryptionKey::from_base64(&urlsafe).unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            EncryptionKey::from_base64(&b64(&[7u8; 31])).unwrap_err(),
            KeyError::WrongLength { got: 31 }
        );
        assert_eq!(
            EncryptionKey::from_base64(&b64(&[7u8; 33])).unwrap_err(),
            KeyError::WrongLength { got: 33 }
        );
        assert_eq!(
            EncryptionKey::from_base64(&b64(&[0u8; 32])).unwrap_err(),
            KeyError::AllZero
        );
        let cycling: Vec<u8> = (0..32u8).map(|i| i % 8).collect();
        assert_eq!(
            EncryptionKey::from_base64(&b64(&cycling)).unwrap_err(),
            KeyError::LowEntropy { distinct: 8 }
        );
        let fifteen: Vec<u8> = (0..32u8).map(|i| i % 15).collect();
        assert_eq!(
            EncryptionKey::from_base64(&b64(&fifteen)).unwrap_err(),
            KeyError::LowEntropy { distinct: 15 }
        );
        let sixteen: Vec<u8> = (0..32u8).map(|i| i % 16).collect();
        assert!(EncryptionKey::from_base64(&b64(&sixteen)).is_ok());
        // Surrounding whitespace (e.g. a trailing newline) is ignored.
        assert!(EncryptionKey::from_base64(&format!(" {FIXED_KEY_B64}\n")).is_ok());
    }

    #[test]
    fn key_errors_never_contain_the_value() {
        let bad = STANDARD.encode([0x41u8; 32]);
        let err = EncryptionKey::from_base64(&bad).unwrap_err().to_string();
        assert!(!err.contains(&bad));
    }

    #[test]
    fn debug_output_never_contains_key_material() {
        let key = EncryptionKey::from_base64(FIXED_KEY_B64).unwrap();
        let old = EncryptionKey::generate();
        let old_b64 = old.to_base64().expose_secret().to_owned();
        let old_hex = hex::encode(old.raw.as_slice());
        let ring = Keyring::new(key.clone(), vec![old]);
        let key_hex = hex::encode(key.raw.as_slice());
        for dbg in [format!("{key:?}"), format!("{ring:?}"), format!("{key:#?}")] {
            for needle in [
                FIXED_KEY_B64,
                key_hex.as_str(),
                old_b64.as_str(),
                old_hex.as_str(),
            ] {
                assert!(!dbg.contains(needle), "{dbg} leaks key material");
            }
            // Partial leaks too: no 16-char window of the key's hex.
            assert!(!dbg.contains(&key_hex[8..24]));
        }
        assert!(format!("{ring:?}").contains(FIXED_KEY_ID));
        assert!(!format!("{:?}", key.to_base64()).contains(FIXED_KEY_B64));
    }

    #[test]
    fn keyring_drops_old_keys_equal_to_the_current_or_repeated() {
        let cur = EncryptionKey::generate();
        let old = EncryptionKey::generate();
        let ring = Keyring::new(cur.clone(), vec![cur.clone(), old.clone(), old.clone()]);
        assert_eq!(ring.key_ids(), vec![cur.id(), old.id()]);
    }

    #[test]
    fn keyring_clones_share_keys() {
        let ring = ring();
        let clone = ring.clone();
        let env = ring.seal(b"x", "t.c:1");
        assert_eq!(clone.open(&env, "t.c:1").unwrap().as_slice(), b"x");
    }

    proptest! {
        #[test]
        fn open_inverts_seal(p in proptest::collection::vec(any::<u8>(), 0..512), aad in ".{0,80}") {
            let ring = Keyring::new(EncryptionKey::from_base64(FIXED_KEY_B64).unwrap(), vec![]);
            let env = ring.seal(&p, &aad);
            let opened = ring.open(&env, &aad).unwrap();
            prop_assert_eq!(opened.as_slice(), p.as_slice());
        }

        #[test]
        fn open_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128), aad in ".{0,40}") {
            let ring = Keyring::new(EncryptionKey::from_base64(FIXED_KEY_B64).unwrap(), vec![]);
            let _ = ring.open(&bytes, &aad);
            let _ = ring.needs_reseal(&bytes);
            let _ = envelope_key_id(&bytes);
        }

        #[test]
        fn open_never_panics_on_arbitrary_bytes_with_a_known_key_id(tail in proptest::collection::vec(any::<u8>(), 0..128)) {
            let ring = Keyring::new(EncryptionKey::from_base64(FIXED_KEY_B64).unwrap(), vec![]);
            let mut env = vec![ENVELOPE_VERSION];
            env.extend_from_slice(&ring.current_id().0);
            env.extend_from_slice(&tail);
            prop_assert!(ring.open(&env, "t.c:1").is_err());
        }

        #[test]
        fn from_base64_never_panics(s in ".{0,80}") {
            let _ = EncryptionKey::from_base64(&s);
        }
    }
}
