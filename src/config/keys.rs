//! The key variables (`SECRET_KEY`, `JWT_SECRET_KEY`, their `*_PREVIOUS` keys,
//! `ENCRYPTION_KEY`, `ENCRYPTION_OLD_KEYS`): how each is read and checked (length, entropy,
//! every key distinct from every other, compared in constant time), `gatehouse keys check`
//! ([`check_keys`]), and the JWT keys built from the configuration
//! ([`JwtKeys::from_config`]): `security` takes plain values and imports no configuration.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::reader::{Lookup, Reader, env_lookup};
use super::{Config, ConfigError, MIN_JWT_DISTINCT_CHARS, MIN_SECRET_CHARS};
use crate::security::jwt::JwtKeys;
use crate::security::keyring::{EncryptionKey, Keyring};

impl JwtKeys {
    /// From the configuration's `JWT_*` variables.
    pub fn from_config(config: &Config) -> Self {
        Self::new(
            &config.jwt_secret_key,
            &config.jwt_issuer,
            &config.jwt_audience,
            config.jwt_ttl_seconds,
        )
        .with_previous(config.jwt_secret_key_previous.as_ref())
    }
}

/// Validates only `ENCRYPTION_KEY`, `ENCRYPTION_OLD_KEYS`, `JWT_SECRET_KEY`
/// and `SECRET_KEY`, with the same rules as [`Config::from_vars`] (for
/// `gatehouse keys check`).
pub fn check_keys(get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    check_keys_lookup(|name| get(name).map_or(Lookup::Unset, Lookup::Value))
}

/// [`check_keys`] over the process environment.
pub fn check_keys_from_env() -> Result<(), ConfigError> {
    check_keys_lookup(env_lookup)
}

fn check_keys_lookup(get: impl Fn(&str) -> Lookup) -> Result<(), ConfigError> {
    let mut r = Reader::new(get);
    let secret_key = read_secret_key(&mut r);
    let jwt = read_jwt_secret_key(&mut r, secret_key.as_ref());
    let _previous = read_previous_keys(&mut r, secret_key.as_ref(), jwt.as_ref());
    let _keyring = read_keyring(&mut r);
    let problems = r.finish();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

pub(super) fn read_secret_key<F: Fn(&str) -> Lookup>(r: &mut Reader<F>) -> Option<SecretString> {
    let key = r.required_secret("SECRET_KEY")?;
    if key.expose_secret().chars().count() < MIN_SECRET_CHARS {
        r.problem("SECRET_KEY", "must be at least 32 characters");
    }
    Some(key)
}

pub(super) fn read_jwt_secret_key<F: Fn(&str) -> Lookup>(
    r: &mut Reader<F>,
    secret_key: Option<&SecretString>,
) -> Option<SecretString> {
    const NAME: &str = "JWT_SECRET_KEY";
    let key = r.required_secret(NAME)?;
    let value = key.expose_secret();
    check_jwt_key_strength(r, NAME, value);
    if let Some(secret_key) = secret_key {
        let same: bool = value
            .as_bytes()
            .ct_eq(secret_key.expose_secret().as_bytes())
            .into();
        if same {
            r.problem(NAME, "must differ from SECRET_KEY");
        }
    }
    Some(key)
}

/// `JWT_SECRET_KEY`'s length and entropy rules, for `name`.
fn check_jwt_key_strength<F: Fn(&str) -> Lookup>(r: &mut Reader<F>, name: &str, value: &str) {
    if value.chars().count() < MIN_SECRET_CHARS {
        r.problem(name, "must be at least 32 characters");
    }
    let mut distinct: Vec<char> = value.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    let distinct_count = distinct.len();
    // Wipe the sorted copy of the secret's characters.
    distinct.fill('\0');
    if distinct_count < MIN_JWT_DISTINCT_CHARS {
        r.problem(
            name,
            "is low-entropy: must contain at least 16 distinct characters",
        );
    }
}

/// Whether two secrets are equal, in constant time.
fn same_secret(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret()
        .as_bytes()
        .ct_eq(b.expose_secret().as_bytes())
        .into()
}

/// `SECRET_KEY_PREVIOUS` and `JWT_SECRET_KEY_PREVIOUS`: optional, each under the rules of
/// its current key, and distinct from every other key (a pair is reported once, on the
/// previous variable; both previous keys equal is reported on `JWT_SECRET_KEY_PREVIOUS`).
pub(super) fn read_previous_keys<F: Fn(&str) -> Lookup>(
    r: &mut Reader<F>,
    secret_key: Option<&SecretString>,
    jwt_secret_key: Option<&SecretString>,
) -> (Option<SecretString>, Option<SecretString>) {
    const SECRET: &str = "SECRET_KEY_PREVIOUS";
    const JWT: &str = "JWT_SECRET_KEY_PREVIOUS";
    let secret_previous = r.optional_secret(SECRET);
    let jwt_previous = r.optional_secret(JWT);
    if let Some(key) = &secret_previous {
        if key.expose_secret().chars().count() < MIN_SECRET_CHARS {
            r.problem(SECRET, "must be at least 32 characters");
        }
        if secret_key.is_some_and(|k| same_secret(k, key)) {
            r.problem(SECRET, "must differ from SECRET_KEY");
        }
        if jwt_secret_key.is_some_and(|k| same_secret(k, key)) {
            r.problem(SECRET, "must differ from JWT_SECRET_KEY");
        }
    }
    if let Some(key) = &jwt_previous {
        check_jwt_key_strength(r, JWT, key.expose_secret());
        if jwt_secret_key.is_some_and(|k| same_secret(k, key)) {
            r.problem(JWT, "must differ from JWT_SECRET_KEY");
        }
        if secret_key.is_some_and(|k| same_secret(k, key)) {
            r.problem(JWT, "must differ from SECRET_KEY");
        }
        if secret_previous
            .as_ref()
            .is_some_and(|k| same_secret(k, key))
        {
            r.problem(JWT, "must differ from SECRET_KEY_PREVIOUS");
        }
    }
    (secret_previous, jwt_previous)
}

pub(super) fn read_keyring<F: Fn(&str) -> Lookup>(r: &mut Reader<F>) -> Option<Keyring> {
    let current = r.required_secret("ENCRYPTION_KEY").and_then(|b64| {
        match EncryptionKey::from_base64(b64.expose_secret()) {
            Ok(key) => Some(key),
            Err(err) => {
                r.problem("ENCRYPTION_KEY", err.to_string());
                None
            }
        }
    });

    let mut old: Vec<EncryptionKey> = Vec::new();
    let mut old_ok = true;
    if let Some(list) = r.optional_secret("ENCRYPTION_OLD_KEYS") {
        for (i, entry) in list.expose_secret().split(',').enumerate() {
            let variable = format!("ENCRYPTION_OLD_KEYS[{i}]");
            let entry = entry.trim();
            if entry.is_empty() {
                r.problem(variable, "is empty (remove the stray comma)");
                old_ok = false;
                continue;
            }
            let key = match EncryptionKey::from_base64(entry) {
                Ok(key) => key,
                Err(err) => {
                    r.problem(variable, err.to_string());
                    old_ok = false;
                    continue;
                }
            };
            if current.as_ref().is_some_and(|c| *c == key) {
                r.problem(
                    variable,
                    "is the same key as ENCRYPTION_KEY (old keys are for decryption only)",
                );
                old_ok = false;
            } else if let Some(j) = old.iter().position(|k| *k == key) {
                r.problem(variable, format!("repeats an earlier entry (index {j})"));
                old_ok = false;
            } else {
                old.push(key);
            }
        }
    }

    match current {
        Some(current) if old_ok => Some(Keyring::new(current, old)),
        _ => None,
    }
}
