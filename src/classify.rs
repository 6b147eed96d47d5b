//! Intent classification: the intent whitelist, the classifier interface, and the built-in
//! rule-based classifier.
//!
//! The rule-based classifier needs no network; it is the default when `LLM_URL` is unset. The
//! LLM classifier (`crate::llm`) implements the same [`Classifier`] interface.

use std::future::Future;
use std::pin::Pin;

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

impl Classification {
    /// What a rejected answer becomes: `other` with confidence 0 and no slots, so it counts as
    /// low confidence and nothing of the answer is kept but the reason.
    pub fn rejected(classifier: &str, reason: &str) -> Self {
        Self {
            intent: Intent::Other,
            confidence: 0.0,
            slots: Map::new(),
            classifier: classifier.to_owned(),
            rejected_reason: Some(reason.to_owned()),
        }
    }
}

/// Why a classifier could not answer at all (as opposed to answering badly, which is a
/// rejected [`Classification`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// The classifier answered 408, 429 or 5xx for this message: a later attempt can
    /// succeed, and this one counts.
    #[error("classifier unavailable: {0}")]
    Unavailable(String),
    /// The classifier could not be reached (refused, reset, closed, no answer in time) or its
    /// circuit is open: an outage, which never uses the job's attempts.
    #[error("classifier unreachable: {0}")]
    Unreachable(String),
    /// The classifier refuses every request (bad credentials, unknown model, wrong URL): no
    /// retry helps until an operator fixes the configuration.
    #[error("classifier misconfigured: {0}")]
    Misconfigured(String),
}

impl ClassifyError {
    /// Whether retrying the job can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Unreachable(_))
    }

    /// Where the failure belongs (`crate::fault`).
    pub fn fault(&self) -> crate::fault::Fault {
        use crate::fault::{Dependency, Fault};
        match self {
            Self::Unavailable(_) => Fault::Retry,
            Self::Unreachable(_) => Fault::Outage(Dependency::Llm),
            Self::Misconfigured(_) => Fault::Permanent,
        }
    }
}

/// The future a [`Classifier`] returns.
pub type ClassifyFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Classification, ClassifyError>> + Send + 'a>>;

/// Classifies one customer message. Implementations: [`RuleClassifier`] (the default) and
/// `crate::llm::LlmClassifier`.
pub trait Classifier: Send + Sync {
    /// Classifies `body`. A bad answer is an `Ok` classification with `rejected_reason` set;
    /// `Err` means no answer could be had.
    fn classify<'a>(&'a self, body: &'a str) -> ClassifyFuture<'a>;

    /// Whether classifying calls another service (worth a database round trip to avoid
    /// asking it twice for a redelivered job). Local classifiers keep the default.
    fn is_remote(&self) -> bool {
        false
    }

    /// The remote endpoint's circuit breaker, if it has one.
    fn circuit(&self) -> Option<std::sync::Arc<crate::circuit::Circuit>> {
        None
    }
}

/// The built-in keyword classifier: no network, never fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleClassifier;

impl Classifier for RuleClassifier {
    fn classify<'a>(&'a self, body: &'a str) -> ClassifyFuture<'a> {
        let classification = classify_with_rules(body);
        Box::pin(async move { Ok(classification) })
    }
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
    fn a_rejected_classification_is_other_with_zero_confidence_and_no_slots() {
        let c = Classification::rejected("llm:m", "unknown_intent");
        assert_eq!(c.intent, Intent::Other);
        assert_eq!(c.confidence, 0.0);
        assert!(c.slots.is_empty());
        assert_eq!(c.rejected_reason.as_deref(), Some("unknown_intent"));
    }

    #[tokio::test]
    async fn the_rule_classifier_answers_through_the_interface() {
        let c = RuleClassifier.classify("hello").await.expect("never fails");
        assert_eq!(c.intent, Intent::Greeting);
        assert_eq!(c.classifier, "rules");
    }

    #[test]
    fn only_unavailability_is_retryable() {
        assert!(ClassifyError::Unavailable("x".into()).is_retryable());
        assert!(!ClassifyError::Misconfigured("x".into()).is_retryable());
    }

    #[test]
    fn keywords_match_whole_words_only() {
        // "this" contains "hi" but is not a greeting.
        assert_eq!(classify_with_rules("this").intent, Intent::Other);
        assert_eq!(classify_with_rules("hi there").intent, Intent::Greeting);
    }
}
