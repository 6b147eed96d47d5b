//! Access tokens: HS256 JWTs signed with `JWT_SECRET_KEY` (never any other key).
//!
//! Rotation: every token names its signing key in a `kid` header, a non-secret id derived
//! from the key ([`key_id`]). Verification picks the key by `kid`: `JWT_SECRET_KEY`, or
//! `JWT_SECRET_KEY_PREVIOUS` while it is set, so tokens signed before a rotation stay valid
//! until they expire. A token without `kid` (issued before kids existed) is checked against
//! `JWT_SECRET_KEY` only; an unknown `kid` is invalid.
//!
//! Validation pins HS256 (any other `alg`, `none` included, is refused before the signature
//! is looked at), requires `exp`, `iat`, `iss`, `aud`, `sub` and `jti`, checks `nbf` when
//! present, and allows [`LEEWAY_SECONDS`] of clock skew.
//!
//! Keys come in as plain values ([`JwtKeys::new`], [`JwtKeys::with_previous`]): this module
//! imports no configuration; `JwtKeys::from_config` is written on the configuration's side
//! (`config/keys.rs`).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Domain separation for [`key_id`], so the id is not a plain hash of the key.
const KEY_ID_LABEL: &[u8] = b"gatehouse/jwt-kid/v1";

/// The `kid` of a signing key: the first 8 hex characters of
/// `SHA-256("gatehouse/jwt-kid/v1" ‖ 0x00 ‖ key)`. Names the key, reveals nothing usable
/// about it.
pub fn key_id(secret: &SecretString) -> String {
    let mut h = Sha256::new();
    h.update(KEY_ID_LABEL);
    h.update([0u8]);
    h.update(secret.expose_secret().as_bytes());
    hex::encode(&h.finalize()[..4])
}

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 30;

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    User,
    Service,
}

/// The claims gatehouse issues and accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub iss: String,
    pub aud: String,
    pub jti: Uuid,
    /// `user` or `service`.
    pub kind: SubjectKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is invalid")]
    Invalid,
    /// Well-formed and signed by us, but past `exp` (plus leeway).
    #[error("the token has expired")]
    Expired,
    #[error("the token could not be signed")]
    Signing,
}

/// An issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub claims: Claims,
}

/// Signs and verifies tokens.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The `kid` of `JWT_SECRET_KEY`, put in every issued token's header.
    kid: String,
    /// `JWT_SECRET_KEY_PREVIOUS`: its `kid` and verification key (never signs).
    previous: Option<(String, DecodingKey)>,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_seconds: u64,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("kid", &self.kid)
            .field("previous_kid", &self.previous.as_ref().map(|(kid, _)| kid))
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JwtKeys {
    pub fn new(secret: &SecretString, issuer: &str, audience: &str, ttl_seconds: u64) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            kid: key_id(secret),
            previous: None,
            validation,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_seconds,
        }
    }

    /// Also accepts tokens signed with `previous` (`JWT_SECRET_KEY_PREVIOUS`), by its `kid`.
    #[must_use]
    pub fn with_previous(mut self, previous: Option<&SecretString>) -> Self {
        self.previous = previous.map(|key| {
            (
                key_id(key),
                DecodingKey::from_secret(key.expose_secret().as_bytes()),
            )
        });
        self
    }

    /// The `kid` that issued tokens carry (that of `JWT_SECRET_KEY`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Issues a token for `subject`.
    pub fn issue(&self, subject: Uuid, kind: SubjectKind) -> Result<Issued, JwtError> {
        let iat = now();
        let claims = Claims {
            sub: subject,
            exp: iat + self.ttl_seconds,
            iat,
            nbf: iat,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: Uuid::now_v7(),
            kind,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|_| JwtError::Signing)?;
        Ok(Issued {
            token,
            expires_in: self.ttl_seconds,
            claims,
        })
    }

    /// Verifies a token and returns its claims. Every failure is the same
    /// [`JwtError::Invalid`]: a caller learns nothing about which check failed.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        // Refuse any header that does not name HS256 before anything else; the library
        // also pins the algorithm, this keeps the rule visible here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Invalid)?;
        if header.alg != Algorithm::HS256 {
            return Err(JwtError::Invalid);
        }
        // The key by `kid`; no `kid` is a token from before kids existed, signed with the
        // current key. An unknown `kid` is never tried against any key.
        let decoding = match header.kid.as_deref() {
            None => &self.decoding,
            Some(kid) if kid == self.kid => &self.decoding,
            Some(kid) => match &self.previous {
                Some((previous, key)) if kid == previous => key,
                _ => return Err(JwtError::Invalid),
            },
        };
        let data = jsonwebtoken::decode::<Claims>(token.as_bytes(), decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
                _ => JwtError::Invalid,
            })?;
        let claims = data.claims;
        // `iat` in the future beyond the leeway is a forged or broken token.
        if claims.iat > now() + LEEWAY_SECONDS {
            return Err(JwtError::Invalid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(
            &SecretString::from("a-jwt-secret-with-enough-entropy-0123456789"),
            "gatehouse",
            "gatehouse-api",
            900,
        )
    }

    #[test]
    fn an_issued_token_verifies_and_carries_its_claims() {
        let k = keys();
        let sub = Uuid::new_v4();
        let issued = k.issue(sub, SubjectKind::User).unwrap();
        let claims = k.verify(&issued.token).unwrap();
        assert_eq!(claims.sub, sub);
        assert_eq!(claims.kind, SubjectKind::User);
        assert_eq!(claims.exp - claims.iat, 900);
        assert_eq!(issued.expires_in, 900);
    }

    fn keys_with(secret: &str, previous: Option<&str>) -> JwtKeys {
        JwtKeys::new(
            &SecretString::from(secret.to_owned()),
            "gatehouse",
            "gatehouse-api",
            900,
        )
        .with_previous(previous.map(|p| SecretString::from(p.to_owned())).as_ref())
    }

    const A: &str = "a-jwt-secret-with-enough-entropy-0123456789";
    const B: &str = "b-JWT-SECRET-with-enough-entropy-9876543210";

    #[test]
    fn the_kid_names_the_key_without_revealing_it() {
        let a = key_id(&SecretString::from(A));
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, key_id(&SecretString::from(B)));
        assert!(!A.contains(&a));
        // Not a plain SHA-256 of the key.
        assert!(!hex::encode(Sha256::digest(A.as_bytes())).starts_with(&a));
        let issued = keys_with(A, None)
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap();
        let header = jsonwebtoken::decode_header(&issued.token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(a.as_str()));
        assert_eq!(header.alg, Algorithm::HS256);
    }

    #[test]
    fn a_token_of_the_previous_key_verifies_only_while_it_is_configured() {
        let old = keys_with(A, None)
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .token;
        assert!(keys_with(B, Some(A)).verify(&old).is_ok());
        assert_eq!(keys_with(B, None).verify(&old), Err(JwtError::Invalid));
        // New tokens are signed with the current key, whatever the previous one is.
        let new = keys_with(B, Some(A))
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .token;
        let kid = jsonwebtoken::decode_header(&new).unwrap().kid;
        assert_eq!(kid, Some(key_id(&SecretString::from(B))));
        assert!(keys_with(B, None).verify(&new).is_ok());
        assert_eq!(keys_with(A, None).verify(&new), Err(JwtError::Invalid));
    }

    #[test]
    fn a_token_without_kid_is_checked_against_the_current_key_only() {
        let claims = keys_with(A, None)
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .claims;
        let sign = |secret: &str| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        // Issued before this release: no kid, signed with the current key.
        assert!(keys_with(A, None).verify(&sign(A)).is_ok());
        assert!(keys_with(A, Some(B)).verify(&sign(A)).is_ok());
        // No kid never falls back to the previous key.
        assert_eq!(
            keys_with(B, Some(A)).verify(&sign(A)),
            Err(JwtError::Invalid)
        );
    }

    #[test]
    fn a_token_with_an_unknown_or_mismatched_kid_is_invalid() {
        let claims = keys_with(A, None)
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .claims;
        let sign = |secret: &str, kid: &str| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(
                &header,
                &claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let k = keys_with(B, Some(A));
        let kid_a = key_id(&SecretString::from(A));
        let kid_b = key_id(&SecretString::from(B));
        assert_eq!(k.verify(&sign(A, "deadbeef")), Err(JwtError::Invalid));
        // Signed with A but claiming B's kid (and the reverse).
        assert_eq!(k.verify(&sign(A, &kid_b)), Err(JwtError::Invalid));
        assert_eq!(k.verify(&sign(B, &kid_a)), Err(JwtError::Invalid));
        assert!(k.verify(&sign(A, &kid_a)).is_ok());
        assert!(k.verify(&sign(B, &kid_b)).is_ok());
    }

    #[test]
    fn every_token_has_its_own_jti() {
        let k = keys();
        let a = k.issue(Uuid::nil(), SubjectKind::Service).unwrap();
        let b = k.issue(Uuid::nil(), SubjectKind::Service).unwrap();
        assert_ne!(a.claims.jti, b.claims.jti);
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        let k = keys();
        for t in ["", ".", "..", "a.b.c", "eyJhbGciOiJub25lIn0..", "🦀.🦀.🦀"] {
            assert_eq!(k.verify(t), Err(JwtError::Invalid), "{t}");
        }
    }

    #[test]
    fn a_token_for_another_issuer_or_audience_is_invalid() {
        let secret = SecretString::from("a-jwt-secret-with-enough-entropy-0123456789");
        let other_iss = JwtKeys::new(&secret, "someone-else", "gatehouse-api", 900);
        let other_aud = JwtKeys::new(&secret, "gatehouse", "other-api", 900);
        let k = keys();
        let t1 = other_iss
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .token;
        let t2 = other_aud
            .issue(Uuid::nil(), SubjectKind::User)
            .unwrap()
            .token;
        assert_eq!(k.verify(&t1), Err(JwtError::Invalid));
        assert_eq!(k.verify(&t2), Err(JwtError::Invalid));
    }
}
