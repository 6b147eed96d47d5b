//! `name=value` lines from stdin: how CLI commands receive secrets.

use std::collections::HashMap;

use secrecy::SecretString;

/// Parses `name=value` lines, accepting only `allowed` names, each at most once. Blank lines
/// and lines starting with `#` are skipped. Errors name the line and the name, never a value.
pub fn parse(input: &str, allowed: &[&str]) -> Result<HashMap<String, SecretString>, String> {
    let mut out = HashMap::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!("stdin line {}: expected name=value", n + 1));
        };
        let name = name.trim();
        if !allowed.contains(&name) {
            return Err(format!(
                "stdin line {}: unknown name {name:?} (expected one of {})",
                n + 1,
                allowed.join(", ")
            ));
        }
        if value.is_empty() {
            return Err(format!("stdin line {}: {name} is empty", n + 1));
        }
        if out
            .insert(name.to_owned(), SecretString::from(value.to_owned()))
            .is_some()
        {
            return Err(format!("stdin line {}: {name} given twice", n + 1));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn lines_become_secrets_and_values_may_contain_equals_signs() {
        let got = parse("a=x=y\n\n# note\nb=2\n", &["a", "b"]).expect("parses");
        assert_eq!(got["a"].expose_secret(), "x=y");
        assert_eq!(got["b"].expose_secret(), "2");
    }

    #[test]
    fn errors_never_echo_a_value() {
        let err = parse("a=topsecret\nzzz", &["a"]).expect_err("bad line");
        assert!(!err.contains("topsecret"));
        let err = parse("c=topsecret", &["a"]).expect_err("unknown");
        assert!(!err.contains("topsecret"));
        let err = parse("a=topsecret\na=topsecret", &["a"]).expect_err("twice");
        assert!(!err.contains("topsecret"));
    }
}
