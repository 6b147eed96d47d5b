//! Validation of one untrusted store product (the rules in the `catalog` module doc): pure.

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// A product that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub external_id: String,
    pub name: String,
    pub sku: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub in_stock: Option<bool>,
    pub url: Option<String>,
}

/// A rejected row: where and why, never what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// Position in the whole listing, from 0.
    pub index: usize,
    pub field: &'static str,
    pub reason: &'static str,
}

const MAX_ID_CHARS: usize = 128;
const MAX_NAME_CHARS: usize = 300;
const MAX_DESCRIPTION_CHARS: usize = 5000;
const MAX_URL_CHARS: usize = 2048;
const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;

fn clean_text(s: &str, keep_newlines: bool) -> String {
    let normalized: String = s.nfc().collect();
    normalized
        .chars()
        .filter(|c| !c.is_control() || (keep_newlines && (*c == '\n' || *c == '\t')))
        .collect::<String>()
        .trim()
        .to_owned()
}

fn printable_token(s: &str, max: usize) -> Option<String> {
    let ok = !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control);
    ok.then(|| s.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Reads a product's id alone (used for the full sync's "still listed" set).
pub fn product_id(value: &Value) -> Option<String> {
    match value.get("id")? {
        Value::String(s) => printable_token(s, MAX_ID_CHARS),
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

fn optional<'a>(obj: &'a serde_json::Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// Validates one untrusted product; `Err((field, rule))` names the first broken rule.
pub fn validate_product(value: &Value) -> Result<Product, (&'static str, &'static str)> {
    let obj = value.as_object().ok_or(("product", "must be an object"))?;
    let external_id = product_id(value).ok_or((
        "id",
        "must be 1-128 printable characters or a non-negative integer",
    ))?;
    let name = match optional(obj, "name") {
        Some(Value::String(s)) => clean_text(s, false),
        _ => return Err(("name", "is required and must be a string")),
    };
    let name_chars = name.chars().count();
    if name_chars == 0 || name_chars > MAX_NAME_CHARS {
        return Err(("name", "must be 1-300 characters"));
    }
    let sku = match optional(obj, "sku") {
        None => None,
        Some(Value::String(s)) => Some(
            printable_token(s, MAX_ID_CHARS)
                .ok_or(("sku", "must be 1-128 printable characters"))?,
        ),
        Some(_) => return Err(("sku", "must be a string")),
    };
    let description = match optional(obj, "description") {
        None => None,
        Some(Value::String(s)) => {
            let d = clean_text(s, true);
            if d.chars().count() > MAX_DESCRIPTION_CHARS {
                return Err(("description", "must be at most 5000 characters"));
            }
            (!d.is_empty()).then_some(d)
        }
        Some(_) => return Err(("description", "must be a string")),
    };
    let price_cents = match optional(obj, "price_cents") {
        None => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(p) if (0..=MAX_PRICE_CENTS).contains(&p) => Some(p),
            _ => return Err(("price_cents", "must be an integer from 0 to 10^12")),
        },
        Some(_) => return Err(("price_cents", "must be an integer from 0 to 10^12")),
    };
    let currency = match optional(obj, "currency") {
        None => None,
        Some(Value::String(s)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) => {
            Some(s.clone())
        }
        Some(_) => return Err(("currency", "must be three upper-case letters")),
    };
    let in_stock = match optional(obj, "in_stock") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(("in_stock", "must be a boolean")),
    };
    let url = match optional(obj, "url") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_URL_CHARS => match url::Url::parse(s) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.has_host() => {
                Some(u.to_string())
            }
            _ => return Err(("url", "must be an http(s) URL")),
        },
        Some(_) => return Err(("url", "must be an http(s) URL of at most 2048 characters")),
    };
    Ok(Product {
        external_id,
        name,
        sku,
        description,
        price_cents,
        currency,
        in_stock,
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_well_formed_product_is_normalized() {
        let p = validate_product(&json!({
            "id": 42, "name": "  Cafe\u{301} au lait\u{7} ", "sku": "SKU-1",
            "description": "line one\nline two", "price_cents": 450, "currency": "EUR",
            "in_stock": true, "url": "https://shop.example/p/42", "extra": {"ignored": true}
        }))
        .expect("valid");
        assert_eq!(p.external_id, "42");
        assert_eq!(p.name, "Café au lait");
        assert_eq!(p.description.as_deref(), Some("line one\nline two"));
        assert_eq!(p.price_cents, Some(450));
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let cases = [
            (json!("nope"), "product"),
            (json!({"name": "x"}), "id"),
            (json!({"id": -1, "name": "x"}), "id"),
            (json!({"id": "a\u{0}b", "name": "x"}), "id"),
            (json!({"id": "x".repeat(129), "name": "x"}), "id"),
            (json!({"id": "1"}), "name"),
            (json!({"id": "1", "name": "\u{7}  "}), "name"),
            (json!({"id": "1", "name": "x".repeat(301)}), "name"),
            (
                json!({"id": "1", "name": "x", "price_cents": 1.5}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "price_cents": -3}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "price_cents": "3"}),
                "price_cents",
            ),
            (
                json!({"id": "1", "name": "x", "currency": "eur"}),
                "currency",
            ),
            (
                json!({"id": "1", "name": "x", "in_stock": "yes"}),
                "in_stock",
            ),
            (
                json!({"id": "1", "name": "x", "url": "javascript:alert(1)"}),
                "url",
            ),
            (
                json!({"id": "1", "name": "x", "description": "d".repeat(5001)}),
                "description",
            ),
            (json!({"id": "1", "name": "x", "sku": 7}), "sku"),
        ];
        for (value, field) in cases {
            let got = validate_product(&value).expect_err("rejected");
            assert_eq!(got.0, field, "{value}");
        }
    }

    #[test]
    fn nulls_count_as_absent() {
        let p = validate_product(&json!({"id": "1", "name": "x", "sku": null, "url": null}))
            .expect("valid");
        assert_eq!(p.sku, None);
        assert_eq!(p.url, None);
    }
}
