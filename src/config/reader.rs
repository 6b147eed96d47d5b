//! The variable reader: looks each variable up once (an empty value counts as unset,
//! non-UTF-8 is a problem), parses it under its rule and collects every [`Problem`] instead
//! of stopping at the first, so `Config::from_env` reports them all at once.

use std::fmt;
use std::str::FromStr;

use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;

use super::{Problem, Rate};

pub(super) enum Lookup {
    Unset,
    Value(String),
    NotUnicode,
}

pub(super) fn env_lookup(name: &str) -> Lookup {
    match std::env::var_os(name) {
        None => Lookup::Unset,
        Some(os) => match os.into_string() {
            Ok(s) => Lookup::Value(s),
            Err(_) => Lookup::NotUnicode,
        },
    }
}

pub(super) struct Reader<F> {
    get: F,
    problems: Vec<Problem>,
}

impl<F: Fn(&str) -> Lookup> Reader<F> {
    pub(super) fn new(get: F) -> Self {
        Self {
            get,
            problems: Vec::new(),
        }
    }

    pub(super) fn finish(self) -> Vec<Problem> {
        self.problems
    }

    pub(super) fn problem(&mut self, variable: impl Into<String>, rule: impl Into<String>) {
        self.problems.push(Problem {
            variable: variable.into(),
            rule: rule.into(),
        });
    }

    /// The raw value; empty counts as unset. Non-UTF-8 is a problem.
    pub(super) fn raw(&mut self, name: &'static str) -> Option<String> {
        match (self.get)(name) {
            Lookup::Unset => None,
            Lookup::Value(v) if v.is_empty() => None,
            Lookup::Value(v) => Some(v),
            Lookup::NotUnicode => {
                self.problem(name, "must be valid UTF-8");
                None
            }
        }
    }

    pub(super) fn was_not_unicode(&self, name: &str) -> bool {
        self.problems
            .last()
            .is_some_and(|p| p.variable == name && p.rule == "must be valid UTF-8")
    }

    pub(super) fn optional_secret(&mut self, name: &'static str) -> Option<SecretString> {
        self.raw(name).map(SecretString::from)
    }

    pub(super) fn required_secret(&mut self, name: &'static str) -> Option<SecretString> {
        let value = self.optional_secret(name);
        if value.is_none() && !self.was_not_unicode(name) {
            self.problem(name, "is required");
        }
        value
    }

    /// An optional non-secret value (surrounding whitespace trimmed) parsed by
    /// `parse`; `None` when unset or invalid (the problem is recorded).
    pub(super) fn optional_parse<T>(
        &mut self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = Zeroizing::new(self.raw(name)?);
        match parse(raw.trim()) {
            Ok(v) => Some(v),
            Err(rule) => {
                self.problem(name, rule);
                None
            }
        }
    }

    pub(super) fn parse<T>(
        &mut self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        self.optional_parse(name, parse).unwrap_or(default)
    }

    pub(super) fn string(&mut self, name: &'static str, default: &str) -> String {
        self.parse(name, default.to_owned(), |s| {
            if s.chars().any(char::is_control) {
                Err("must not contain control characters".to_owned())
            } else {
                Ok(s.to_owned())
            }
        })
    }

    pub(super) fn integer<T>(&mut self, name: &'static str, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + Copy + fmt::Display,
    {
        self.parse(name, default, |s| match s.parse::<T>() {
            Ok(v) if s.bytes().all(|b| b.is_ascii_digit()) && v >= min && v <= max => Ok(v),
            _ => Err(format!("must be a whole number from {min} to {max}")),
        })
    }

    pub(super) fn rate(&mut self, name: &'static str, default: Rate) -> Rate {
        self.parse(name, default, |s| {
            s.parse::<Rate>().map_err(|e| e.to_string())
        })
    }

    /// A comma-separated list; each entry is trimmed and parsed, problems are
    /// reported as `NAME[index]`.
    pub(super) fn list<T>(
        &mut self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let Some(raw) = self.raw(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, entry) in raw.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                self.problem(format!("{name}[{i}]"), "is empty (remove the stray comma)");
                continue;
            }
            match parse(entry) {
                Ok(v) => out.push(v),
                Err(rule) => self.problem(format!("{name}[{i}]"), rule),
            }
        }
        out
    }
}
