//! Fuzzes Twilio signature verification with hostile URLs, bodies and headers: it must
//! never panic, and a body signed with the tenant's token must always verify.
#![no_main]

#[path = "../../src/security/twilio.rs"]
#[allow(dead_code)]
mod twilio;

use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    // Split the input into URL, body, signature header and settings header.
    let mut parts = data.splitn(4, |b| *b == 0xff);
    let url = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let signature = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let settings = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();

    let token = SecretString::from("12345abcdef67890fedcba0987654321".to_owned());
    let shared = [twilio::SharedKey::new("KS1", b"whsk_0123456789abcdef".to_vec())];
    let keys = twilio::TenantKeys {
        auth_token: &token,
        shared_keys: &shared,
    };
    for with_settings in [false, true] {
        let headers = twilio::Headers {
            signature: Some(&signature),
            signature_settings: with_settings.then_some(settings.as_str()),
        };
        let _ = twilio::verify(&url, twilio::Body::Form(body), headers, &keys);
        let _ = twilio::verify(&url, twilio::Body::Json(body), headers, &keys);
    }

    // What Twilio would send for these parameters must verify.
    if url.starts_with("https://") && url.is_ascii() && !url.contains(['#', ' ']) {
        let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let good = twilio::sign_form(&url, &refs, b"12345abcdef67890fedcba0987654321", twilio::Algorithm::HmacSha1);
        let headers = twilio::Headers {
            signature: Some(&good),
            signature_settings: None,
        };
        if let Err(err) = twilio::verify(&url, twilio::Body::Form(body), headers, &keys) {
            // Only URLs the verifier refuses outright (InvalidUrl) and forms past the
            // parameter limit may fail here.
            let too_many = params.len() > twilio::MAX_FORM_PARAMS;
            assert!(
                err == twilio::SignatureError::InvalidUrl
                    || (too_many && err == twilio::SignatureError::TooManyParameters),
                "{url:?}: {err:?}"
            );
        }
    }
});
