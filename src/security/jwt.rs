//! Access tokens: HS256 JWTs signed with `JWT_SECRET_KEY` (never any other key).
//!
//! Validation pins HS256 (any other `alg`, `none` included, is refused before the signature
//! is looked at), requires `exp`, `iat`, `iss`, `aud`, `sub` and `jti`, checks `nbf` when
//! present, and allows [`LEEWAY_SECONDS`] of clock skew.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
            validation,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_seconds,
        }
    }

    /// From the configuration's `JWT_*` variables.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(
            &config.jwt_secret_key,
            &config.jwt_issuer,
            &config.jwt_audience,
            config.jwt_ttl_seconds,
        )
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
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
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
        let data =
            jsonwebtoken::decode::<Claims>(token.as_bytes(), &self.decoding, &self.validation)
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
