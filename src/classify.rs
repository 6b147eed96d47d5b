//! Intent classification: the intent whitelist and the built-in rule-based classifier.
//!
//! The rule-based classifier needs no network; it is the default when `LLM_URL` is unset.

use serde_json::{Map, Value};

/// The fixed intent whitelist (SPEC "Precise points").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Greeting,
    ProductQuestion,
    OrderStatus,
    PlaceOrder,
    CancelOrder,
    Complaint,
    HumanHandoff,
    Other,
}

impl Intent {
    /// Every intent, in a stable order.
    pub const ALL: [Intent; 8] = [
        Self::Greeting,
        Self::ProductQuestion,
        Self::OrderStatus,
        Self::PlaceOrder,
        Self::CancelOrder,
        Self::Complaint,
        Self::HumanHandoff,
        Self::Other,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Greeting => "greeting",
            Self::ProductQuestion => "product_question",
            Self::OrderStatus => "order_status",
            Self::PlaceOrder => "place_order",
            Self::CancelOrder => "cancel_order",
            Self::Complaint => "complaint",
            Self::HumanHandoff => "human_handoff",
            Self::Other => "other",
        }
    }

    /// Parses a whitelisted name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.as_str() == name)
    }
}

/// A validated classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub intent: Intent,
    /// In [0, 1].
    pub confidence: f64,
    /// Validated slot values (strings, finite numbers, booleans).
    pub slots: Map<String, Value>,
    /// Which classifier answered (`rules`, `llm:{model}`).
    pub classifier: String,
    /// Why an answer was rejected, if it was (then confidence is 0).
    pub rejected_reason: Option<String>,
}

const RULES: &[(Intent, f64, &[&str])] = &[
    (
        Intent::HumanHandoff,
        0.95,
        &[
            "human",
            "real person",
            "agent",
            "representative",
            "speak to someone",
        ],
    ),
    (
        Intent::CancelOrder,
        0.9,
        &[
            "cancel my order",
            "cancel order",
            "cancel the order",
            "cancel",
        ],
    ),
    (
        Intent::OrderStatus,
        0.9,
        &[
            "where is my order",
            "order status",
            "tracking",
            "shipped",
            "delivery",
            "when will",
        ],
    ),
    (
        Intent::Complaint,
        0.85,
        &[
            "complaint",
            "broken",
            "damaged",
            "terrible",
            "refund",
            "angry",
            "worst",
        ],
    ),
    (
        Intent::PlaceOrder,
        0.85,
        &[
            "i want to buy",
            "i'd like to order",
            "place an order",
            "buy",
            "order",
        ],
    ),
    (
        Intent::ProductQuestion,
        0.8,
        &[
            "do you have",
            "in stock",
            "price",
            "how much",
            "size",
            "colour",
            "color",
            "available",
        ],
    ),
    (
        Intent::Greeting,
        0.9,
        &["hello", "hi", "hey", "good morning", "good evening", "hola"],
    ),
];

/// Classifies a message with keyword rules. Unrecognized text is `other` with a low
/// confidence, which counts towards a human handoff.
pub fn classify_with_rules(body: &str) -> Classification {
    let text = body.to_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .collect();
    let matches = |needle: &str| {
        if needle.contains(' ') {
            text.contains(needle)
        } else {
            words.contains(&needle)
        }
    };
    let mut slots = Map::new();
    if let Some(pos) = words.iter().position(|w| *w == "size")
        && let Some(size) = words.get(pos + 1)
        && size.len() <= 8
    {
        slots.insert("size".to_owned(), Value::String((*size).to_owned()));
    }
    for (intent, confidence, needles) in RULES {
        if needles.iter().any(|n| matches(n)) {
            return Classification {
                intent: *intent,
                confidence: *confidence,
                slots,
                classifier: "rules".to_owned(),
                rejected_reason: None,
            };
        }
    }
    Classification {
        intent: Intent::Other,
        confidence: 0.3,
        slots,
        classifier: "rules".to_owned(),
        rejected_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_questions_are_recognized_with_their_size() {
        let c = classify_with_rules("Do you have the blue shoes in size 42?");
        assert_eq!(c.intent, Intent::ProductQuestion);
        assert!(c.confidence >= 0.6);
        assert_eq!(c.slots.get("size"), Some(&Value::String("42".into())));
    }

    #[test]
    fn gibberish_is_other_with_low_confidence() {
        let c = classify_with_rules("qwzx vbnm");
        assert_eq!(c.intent, Intent::Other);
        assert!(c.confidence < 0.6);
    }

    #[test]
    fn every_intent_name_round_trips_through_the_whitelist() {
        for intent in Intent::ALL {
            assert_eq!(Intent::parse(intent.as_str()), Some(intent));
        }
        assert_eq!(Intent::parse("drop_tables"), None);
    }

    #[test]
    fn keywords_match_whole_words_only() {
        // "this" contains "hi" but is not a greeting.
        assert_eq!(classify_with_rules("this").intent, Intent::Other);
        assert_eq!(classify_with_rules("hi there").intent, Intent::Greeting);
    }
}
