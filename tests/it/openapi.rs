//! The OpenAPI 3.1 document at `/openapi.json` against the router that really serves: every
//! (method, path) the router holds is documented, and every documented operation is served.
//!
//! The router's own table is read from axum's `Debug` of the built `Router` (paths and, per
//! path, which methods have a handler): whatever way a route is added (`routes!`, `.route`,
//! `.merge`, `.nest`), an undocumented one fails here.

use std::collections::BTreeSet;

use gatehouse_testenv::*;
use serde_json::Value;

const METHODS: [&str; 7] = ["get", "head", "delete", "options", "patch", "post", "put"];

/// `(METHOD, path)` pairs of the router's path table, parsed from `Debug`.
fn served_routes(router: &axum::Router) -> BTreeSet<(String, String)> {
    let debug = format!("{router:?}");
    let table = debug
        .split(", fallback_router:")
        .next()
        .expect("a path router");
    // RouteId(n) -> path
    let paths_at = table
        .find("node: Node { paths: {")
        .expect("the node's paths");
    let paths_text = &table[paths_at..];
    let mut paths = std::collections::HashMap::new();
    for part in paths_text.split("RouteId(").skip(1) {
        let (id, rest) = part.split_once(')').expect("route id");
        if let Some(path) = rest.strip_prefix(": \"").and_then(|r| r.split('"').next()) {
            paths.insert(id.to_owned(), path.to_owned());
        }
    }
    // RouteId(n) -> methods with an endpoint
    let routes_text = &table[..paths_at];
    let mut out = BTreeSet::new();
    for part in routes_text.split("RouteId(").skip(1) {
        let (id, rest) = part.split_once(')').expect("route id");
        let Some(fields) = rest.split_once("MethodRouter { ").map(|(_, f)| f) else {
            panic!("route {id} is not a method router: {rest}");
        };
        let fields = fields.split(", fallback:").next().expect("fields");
        let path = paths.get(id).expect("every route has a path");
        for field in fields.split(", ") {
            let (method, endpoint) = field.split_once(": ").expect("method: endpoint");
            if METHODS.contains(&method) && endpoint != "None" {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// `(METHOD, path)` pairs of the document.
fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_the_router_serves_and_nothing_else() {
    let env = TestEnv::new().await;
    let served = served_routes(&gatehouse::http::router(env.app_state()));
    assert!(
        served.len() >= 14,
        "the router's table was read: {served:?}"
    );
    assert!(served.contains(&("GET".into(), "/v1/admin/security-events".into())));

    let server = env.start_server().await;
    let http = reqwest::Client::new();
    let r = http
        .get(server.url("/openapi.json"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.expect("json");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "OpenAPI 3.1: {}",
        doc["openapi"]
    );
    let documented = documented_routes(&doc);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in /openapi.json (annotate the handler with #[utoipa::path] and \
         register it with routes!): {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );

    // Every documented operation answers through its handler, not the 404/405 fallbacks.
    for (method, path) in &documented {
        let concrete = path
            .replace("{tenant_id}", &uuid::Uuid::new_v4().to_string())
            .replace("{user_id}", &uuid::Uuid::new_v4().to_string())
            .replace("{queue}", "inbound_message");
        let r = http
            .request(method.parse().expect("method"), server.url(&concrete))
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .expect("request");
        assert!(
            r.status() != 404 && r.status() != 405,
            "{method} {path} answered {}",
            r.status()
        );
    }

    // Every operation with a JSON request body documents what a bad body gets.
    let mut with_body = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let json_body = op["requestBody"]["content"]
                .as_object()
                .is_some_and(|c| c.contains_key("application/json"));
            if !json_body {
                continue;
            }
            with_body += 1;
            for status in ["400", "413", "415"] {
                assert!(
                    op["responses"][status]["content"]["application/json"].is_object(),
                    "{method} {path} documents no {status} error body"
                );
            }
        }
    }
    assert!(with_body >= 7, "operations with a JSON body: {with_body}");

    // The bearer scheme, the error body and the security events' read-back shape.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert!(error["properties"]["error"].is_object(), "{error}");
    let event = &doc["components"]["schemas"]["StoredEvent"]["properties"];
    for field in [
        "id",
        "type",
        "occurred_at",
        "ip",
        "user_id",
        "email",
        "tenant_id",
        "details",
    ] {
        assert!(event.get(field).is_some(), "StoredEvent.{field}");
    }
    // Operation ids are unique (client generators name methods after them) and every
    // operation has one.
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(ids.insert(id.to_owned()), "operationId {id} is used twice");
        }
    }
    // The constraints the handlers enforce are stated (a schema-valid body is never refused).
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["SetRole"]["properties"]["role"]["enum"],
        serde_json::json!(["owner", "admin", "agent"])
    );
    assert!(
        schemas["CreateTenant"]["properties"]["twilio_account_sid"]["pattern"].is_string(),
        "{}",
        schemas["CreateTenant"]
    );
    assert_eq!(
        schemas["RegisterRequest"]["properties"]["password"]["minLength"],
        12
    );
    assert_eq!(
        schemas["CreateTenant"]["dependentRequired"]["webhook_shared_key"],
        serde_json::json!(["webhook_shared_key_id"])
    );
    let login = &doc["paths"]["/v1/auth/login"]["post"];
    assert!(login["requestBody"].is_object());
    assert!(login["responses"]["401"].is_object());
    let events = &doc["paths"]["/v1/admin/security-events"]["get"];
    assert!(
        events["security"].is_array(),
        "the events API needs a bearer token"
    );
    let params: Vec<&str> = events["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, ["type", "since", "limit", "before"]);
    // The dashboard's pages are HTML, and say what a caller without a session or scope gets.
    let page = &doc["paths"]["/admin/queues"]["get"]["responses"];
    assert!(page["200"]["content"]["text/html"].is_object(), "{page}");
    assert!(page["303"].is_object() && page["403"].is_object(), "{page}");
    server.stop().await;
    env.cleanup().await;
}
