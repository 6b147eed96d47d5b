//! The `/admin` operator dashboard over HTTP against real PostgreSQL and Redis: login,
//! sessions and their cookie, scopes per request, CSRF on every form, headers, escaping —
//! and the whole thing in a real headless Chromium (`a_real_chromium_…`).

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use crate::webdriver;
use gatehouse::access::PlatformRole;
use gatehouse::tenants::NewTenant;
use gatehouse_jobs::SyncCatalog;
use gatehouse_jobs::SyncMode;
use gatehouse_jobs::client::Enqueue;
use gatehouse_testenv::*;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, SET_COOKIE};
use secrecy::SecretString;
use uuid::Uuid;

const OFFICER: &str = "officer@example.com";
/// A platform admin: reads the dashboard like an officer, and alone may retry dead jobs.
const ADMIN: &str = "admin@example.com";
const HOSTILE: &str = "<script>alert(\"x\")</script><img src=x onerror=alert(1)>";

/// A cookie-keeping client, as a browser behind the (trusted, loopback) TLS proxy, of the
/// ingress at `base` (an in-process server or a `gatehouse serve` process).
pub(crate) struct Agent {
    http: reqwest::Client,
    base: String,
    cookies: HashMap<String, String>,
    set_cookies: Vec<String>,
}

pub(crate) struct Page {
    pub(crate) status: StatusCode,
    headers: HeaderMap,
    pub(crate) body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').expect("closing quote")].to_owned()
    }
}

impl Agent {
    fn new(server: &TestServer) -> Self {
        Self::at(&server.url(""))
    }

    /// An agent of the ingress at `base` (`http://127.0.0.1:{port}`).
    pub(crate) fn at(base: &str) -> Self {
        Self {
            http: client(),
            base: base.to_owned(),
            cookies: HashMap::new(),
            set_cookies: Vec::new(),
        }
    }

    /// An agent signed in as the security officer `OFFICER` (the sign-in must answer 303).
    async fn officer(server: &TestServer) -> Self {
        let mut agent = Self::new(server);
        let done = agent.login(OFFICER, PASSWORD).await;
        assert_eq!(done.status, 303, "{}", done.body);
        agent
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Page {
        let mut request = request.header("x-forwarded-proto", "https");
        if !self.cookies.is_empty() {
            request = request.header("cookie", self.cookie_header());
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        for value in headers.get_all(SET_COOKIE) {
            let text = value.to_str().expect("ascii cookie").to_owned();
            let pair = text.split(';').next().unwrap_or_default();
            let (name, value) = pair.split_once('=').expect("name=value");
            if text.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
            self.set_cookies.push(text);
        }
        let body = response.text().await.expect("body");
        Page {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Page {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(request).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        self.post_with(path, form, &[]).await
    }

    async fn post_with(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Page {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        self.send(request).await
    }

    /// Opens the login form and signs in.
    pub(crate) async fn login(&mut self, email: &str, password: &str) -> Page {
        let form = self.get("/admin/login").await;
        assert_eq!(form.status, 200);
        let csrf = form.csrf();
        self.post(
            "/admin/login",
            &[("csrf", &csrf), ("email", email), ("password", password)],
        )
        .await
    }
}

pub(crate) const PAGES: [&str; 6] = [
    "/admin",
    "/admin/auth",
    "/admin/rate-limits",
    "/admin/webhooks",
    "/admin/queues",
    "/admin/rotations",
];

/// Every tag of an HTML page, `<` to `>`.
fn tags(html: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        let end = rest[start..]
            .find('>')
            .map_or(rest.len(), |e| start + e + 1);
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    out
}

/// Waits (at most 10 s) for `at_least` CSRF refusals to be recorded; returns the count.
async fn csrf_events(env: &TestEnv, at_least: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM security_events
              WHERE type = 'permission_denied' AND details->>'reason' = 'csrf'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("count");
        if n >= at_least || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn session_keys(env: &TestEnv) -> usize {
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:admin:session:*", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("keys");
    keys.len()
}

/// Makes a dead `sync_catalog` job the real way (an unknown tenant fails permanently).
async fn dead_job(env: &TestEnv) -> String {
    let worker = env.start_worker();
    let mut redis = env.redis.clone();
    let job = SyncCatalog {
        tenant_id: Uuid::new_v4(),
        requested_by: Uuid::new_v4(),
        mode: SyncMode::Full,
    };
    let enqueued = env
        .queues()
        .enqueue(&mut redis, &job, Enqueue::default())
        .await
        .expect("enqueue");
    assert!(
        env.wait_for_dead("sync_catalog", &enqueued.job_id, Duration::from_secs(20))
            .await,
        "the job is dead-lettered"
    );
    worker.stop().await.expect("worker stops");
    enqueued.job_id
}

async fn is_dead(env: &TestEnv, job_id: &str) -> bool {
    let mut redis = env.redis.clone();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{}:{{sync_catalog:0}}:dead", env.namespace))
        .arg(job_id)
        .query_async(&mut redis)
        .await
        .expect("zscore");
    score.is_some()
}

#[tokio::test]
async fn every_page_redirects_to_the_login_form_without_a_live_session() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    for path in PAGES {
        let page = agent.get(path).await;
        assert_eq!(page.status, 303, "{path}");
        assert_eq!(page.location(), "/admin/login", "{path}");
    }
    // A made-up session id is no session.
    agent.cookies.insert(
        "__Host-gh_admin".into(),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
    );
    let page = agent.get("/admin").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/admin/login");
    // Plain HTTP (DEBUG=false) never reaches the dashboard: 301 to https first.
    let plain = agent
        .http
        .get(server.url("/admin/login"))
        .send()
        .await
        .expect("request");
    assert_eq!(plain.status(), 301);
    assert_eq!(
        plain
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok()),
        Some("https://gh.example.com/admin/login")
    );
    // And the retry form without a session does nothing but redirect.
    let page = agent
        .post("/admin/queues/retry", &[("csrf", "x"), ("job_id", "y")])
        .await;
    assert_eq!(page.status, 303);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_answer_and_failed_login_events() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);

    let wrong = agent.login(OFFICER, "not the password").await;
    let unknown = agent.login("nobody@example.com", PASSWORD).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(unknown.status, 401);
    let message = "The email or password is not valid.";
    assert!(wrong.body.contains(message), "{}", wrong.body);
    assert!(unknown.body.contains(message), "{}", unknown.body);
    assert!(!agent.cookies.contains_key("__Host-gh_admin"), "no session");
    assert_eq!(session_keys(&env).await, 0);
    assert_eq!(env.wait_for_events("failed_login", 2).await, 2);
    let (emails, surfaces): (Vec<Option<String>>, Vec<Option<String>>) = sqlx::query_as::<_, (Option<String>, Option<String>)>(
        "SELECT email, details->>'surface' FROM security_events WHERE type = 'failed_login' ORDER BY email",
    )
    .fetch_all(&env.pool)
    .await
    .expect("events")
    .into_iter()
    .unzip();
    assert_eq!(
        emails,
        vec![Some("nobody@example.com".into()), Some(OFFICER.into())]
    );
    assert_eq!(surfaces, vec![Some("admin".into()), Some("admin".into())]);
    // Nothing secret in the stored details.
    let details: Vec<String> = sqlx::query_scalar("SELECT details::text FROM security_events")
        .fetch_all(&env.pool)
        .await
        .expect("details");
    assert!(
        details
            .iter()
            .all(|d| !d.contains("not the password") && !d.contains(PASSWORD))
    );

    // A login post without the form's token is refused before any password work.
    let page = agent
        .post(
            "/admin/login",
            &[("email", OFFICER), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(page.status, 403);
    assert_eq!(session_keys(&env).await, 0);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_login_form_counts_against_the_per_ip_and_per_email_limits() {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("RATE_LIMIT_LOGIN_EMAIL".into(), "2/h".into());
    })
    .await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    assert_eq!(agent.login(OFFICER, "wrong one").await.status, 401);
    assert_eq!(agent.login(OFFICER, "wrong two").await.status, 401);
    // The email is now locked: even the right password is refused, with Retry-After.
    let locked = agent.login(OFFICER, PASSWORD).await;
    assert_eq!(locked.status, 429);
    assert!(locked.headers.contains_key("retry-after"));
    assert!(!agent.cookies.contains_key("__Host-gh_admin"));
    server.stop().await;
    env.cleanup().await;

    let env = TestEnv::with_vars(|vars| {
        vars.insert("RATE_LIMIT_LOGIN_IP".into(), "3/m".into());
    })
    .await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            agent
                .login("someone@example.com", "x")
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![401, 401, 401, 429]);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn csrf_and_session_refusals_count_against_the_unauthenticated_limit_but_genuine_logins_do_not()
 {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("RATE_LIMIT_UNAUTHENTICATED_IP".into(), "3/m".into());
    })
    .await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    // Two login posts without the form's token, one made-up session cookie.
    for _ in 0..2 {
        let page = agent
            .post(
                "/admin/login",
                &[("email", OFFICER), ("password", PASSWORD)],
            )
            .await;
        assert_eq!(page.status, 403);
    }
    let mut forger = Agent::new(&server);
    forger
        .cookies
        .insert("__Host-gh_admin".into(), "A".repeat(43));
    let page = forger.get("/admin").await;
    assert_eq!(page.status, 303);
    // The budget is spent: the next CSRF refusal is a 429 page with Retry-After.
    let page = agent
        .post(
            "/admin/login",
            &[("email", OFFICER), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(page.status, 429);
    assert!(page.headers.contains_key("retry-after"));
    assert_eq!(
        page.headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok()),
        Some("0")
    );
    forger
        .cookies
        .insert("__Host-gh_admin".into(), "E".repeat(43));
    assert_eq!(forger.get("/admin").await.status, 429);
    // A genuine sign-in from the same address is neither counted nor refused.
    let done = agent.login(OFFICER, PASSWORD).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(agent.get("/admin").await.status, 200);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_password_typed_into_the_dashboards_email_field_is_never_stored() {
    let env = TestEnv::new().await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    let typed = "MyS3cret pass phrase";
    let page = agent.login(typed, "whatever").await;
    assert_eq!(page.status, 401);
    assert_eq!(env.wait_for_events("failed_login", 1).await, 1);
    let (email, details): (Option<String>, serde_json::Value) =
        sqlx::query_as("SELECT email, details FROM security_events WHERE type = 'failed_login'")
            .fetch_one(&env.pool)
            .await
            .expect("event");
    assert_eq!(email, None);
    assert_eq!(details["email_shape"], serde_json::json!(false));
    assert_eq!(details["surface"], serde_json::json!("admin"));
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(e)::text FROM security_events e")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    assert!(
        rows.iter().all(|r| !r.to_lowercase().contains("mys3cret")),
        "{rows:?}"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn login_sets_a_host_prefixed_secure_httponly_strict_cookie_and_every_page_carries_the_csp() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    let done = agent.login(OFFICER, PASSWORD).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.location(), "/admin");
    let set: Vec<&str> = done
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    let session = set
        .iter()
        .find(|c| c.starts_with("__Host-gh_admin="))
        .expect("a session cookie");
    let value = &session["__Host-gh_admin=".len()..session.find(';').expect("attributes")];
    assert_eq!(value.len(), 43, "256 random bits, base64url");
    assert_eq!(
        *session,
        format!("__Host-gh_admin={value}; Path=/; Secure; HttpOnly; SameSite=Strict")
    );
    assert!(
        set.iter()
            .any(|c| c.starts_with("__Host-gh_login=;") && c.contains("Max-Age=0")),
        "the login nonce is cleared: {set:?}"
    );
    // Redis keeps a hash of the id, never the id.
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:admin:*", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].contains(value));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut redis)
        .await
        .expect("ttl");
    assert!(ttl > 0 && ttl <= 30 * 60, "idle expiry, got {ttl}");

    let expected_csp = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
    for path in PAGES.iter().copied().chain(["/admin/login"]) {
        let page = agent.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        let h = |name: &str| {
            page.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(h("content-security-policy"), expected_csp, "{path}");
        assert_eq!(h("x-frame-options"), "DENY", "{path}");
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(h("referrer-policy"), "no-referrer", "{path}");
        assert!(
            h("strict-transport-security").starts_with("max-age=31536000"),
            "{path}"
        );
        assert_eq!(h("cache-control"), "no-store", "{path}");
        assert!(h("content-type").starts_with("text/html"), "{path}");
        // No script, no inline style, no event handler attribute anywhere.
        let body = page.body.to_ascii_lowercase();
        assert!(!body.contains("<script"), "{path}");
        assert!(!body.contains("style="), "{path}");
        assert!(
            !body.contains(" onerror=")
                && !body.contains(" onload=")
                && !body.contains(" onclick="),
            "{path}"
        );
        // Every form carries a CSRF token.
        assert_eq!(
            body.matches("<form").count(),
            body.matches("name=\"csrf\"").count(),
            "{path}"
        );
    }
    let css = agent.get("/admin/static/admin.css").await;
    assert_eq!(css.status, 200);
    assert!(
        css.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/css")
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_user_without_security_read_cannot_sign_in_and_losing_the_role_applies_on_the_next_request()
 {
    let env = TestEnv::new().await;
    create_user(&env, "service@example.com", Some(PlatformRole::Service)).await;
    let officer = create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;

    let mut admin = Agent::new(&server);
    let refused = admin.login("service@example.com", PASSWORD).await;
    // The right password of an account without the scope gets the wrong-password answer, so
    // the form never confirms a password.
    let mut guesser = Agent::new(&server);
    let wrong = guesser
        .login("service@example.com", "not-the-password-at-all")
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(wrong.status, 401);
    for page in [&refused, &wrong] {
        assert!(page.body.contains("The email or password is not valid."));
    }
    assert!(
        !admin.cookies.contains_key("__Host-gh_admin"),
        "no session for them"
    );
    assert_eq!(env.wait_for_events("permission_denied", 1).await, 1);

    let mut agent = Agent::officer(&server).await;
    assert_eq!(agent.get("/admin/queues").await.status, 200);
    // The role goes (as a role change does: rows, then the scope version).
    sqlx::query("UPDATE users SET platform_role = NULL WHERE id = $1")
        .bind(officer)
        .execute(&env.pool)
        .await
        .expect("update");
    let mut redis = env.redis.clone();
    gatehouse::access::ScopeCache::new(env.namespace.clone())
        .bump(&mut redis, officer)
        .await
        .expect("bump");
    for path in PAGES {
        assert_eq!(agent.get(path).await.status, 403, "{path}");
    }
    assert!(env.wait_for_events("permission_denied", 7).await >= 7);
    // Deactivated: the session is dropped altogether.
    sqlx::query(
        "UPDATE users SET platform_role = 'security_officer', is_active = false WHERE id = $1",
    )
    .bind(officer)
    .execute(&env.pool)
    .await
    .expect("update");
    gatehouse::access::ScopeCache::new(env.namespace.clone())
        .bump(&mut redis, officer)
        .await
        .expect("bump");
    let page = agent.get("/admin").await;
    assert_eq!(page.status, 303);
    assert_eq!(session_keys(&env).await, 0);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_retry_without_or_with_a_wrong_token_is_refused_and_the_right_token_requeues_the_dead_job()
 {
    let env = TestEnv::new().await;
    create_user(&env, ADMIN, Some(PlatformRole::PlatformAdmin)).await;
    let job_id = dead_job(&env).await;
    let server = env.start_server().await;
    let mut agent = Agent::new(&server);
    assert_eq!(agent.login(ADMIN, PASSWORD).await.status, 303);
    // A tenant with a backlog (admitted into the fair order by a fetch that takes nothing) is
    // listed under the top tenants by backlog, with its count.
    let noisy = Uuid::new_v4();
    let jobs: Vec<SyncCatalog> = (0..3)
        .map(|_| SyncCatalog {
            tenant_id: noisy,
            requested_by: Uuid::new_v4(),
            mode: SyncMode::Full,
        })
        .collect();
    env.queues()
        .enqueue_batch(&mut env.redis.clone(), &jobs)
        .await
        .expect("enqueue");
    let keys = gatehouse::queue::keys::QueueKeys::new(&env.namespace, "sync_catalog");
    gatehouse::queue::consume::register(&mut env.redis.clone(), &keys, "admit")
        .await
        .expect("register");
    gatehouse::queue::consume::fetch(
        &mut env.redis.clone(),
        &keys,
        gatehouse::queue::consume::Fairness::default(),
        "admit",
        0,
    )
    .await
    .expect("admit");
    let queues = agent.get("/admin/queues").await;
    assert_eq!(queues.status, 200);
    assert!(queues.body.contains(&job_id), "the dead job is listed");
    assert!(queues.body.contains("Top tenants by backlog"));
    assert!(
        queues.body.contains(&format!(
            "<td>sync_catalog</td><td><code>{noisy}</code></td><td class=\"num\">3</td>"
        )),
        "the noisy tenant and its backlog are listed"
    );
    let csrf = queues.csrf();

    let without = agent
        .post("/admin/queues/retry", &[("job_id", &job_id)])
        .await;
    assert_eq!(without.status, 403);
    let mut wrong = csrf.clone();
    wrong.replace_range(0..1, if csrf.starts_with('A') { "B" } else { "A" });
    let wrong = agent
        .post(
            "/admin/queues/retry",
            &[("csrf", &wrong), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(wrong.status, 403);
    // Another user's (or a stale session's) token is wrong too.
    let mut other = Agent::new(&server);
    assert_eq!(other.login(ADMIN, PASSWORD).await.status, 303);
    let other_csrf = other.get("/admin/queues").await.csrf();
    assert_ne!(other_csrf, csrf);
    let foreign = agent
        .post(
            "/admin/queues/retry",
            &[("csrf", &other_csrf), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(foreign.status, 403);
    // The right token from a foreign origin is refused as well.
    let cross = agent
        .post_with(
            "/admin/queues/retry",
            &[("csrf", &csrf), ("job_id", &job_id)],
            &[
                ("origin", "http://127.0.0.1:1"),
                ("sec-fetch-site", "same-site"),
            ],
        )
        .await;
    assert_eq!(cross.status, 403);
    assert!(is_dead(&env, &job_id).await, "nothing was retried");
    assert_eq!(env.queued("sync_catalog").await, 0);

    let right = agent
        .post(
            "/admin/queues/retry",
            &[("csrf", &csrf), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(right.status, 303, "{}", right.body);
    assert_eq!(right.location(), "/admin/queues?notice=retried");
    assert!(!is_dead(&env, &job_id).await);
    assert_eq!(env.queued("sync_catalog").await, 1, "back on its queue");
    let after = agent.get("/admin/queues?notice=retried").await;
    assert!(after.body.contains("The job is back on its queue."));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_security_officer_only_reads_retrying_a_dead_job_needs_platform_admin() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    create_user(&env, ADMIN, Some(PlatformRole::PlatformAdmin)).await;
    let job_id = dead_job(&env).await;
    let server = env.start_server().await;

    let mut officer = Agent::officer(&server).await;
    let queues = officer.get("/admin/queues").await;
    assert_eq!(queues.status, 200);
    assert!(
        queues.body.contains(&job_id),
        "the officer sees the dead job"
    );
    assert!(
        !queues.body.contains("/admin/queues/retry"),
        "but no retry button"
    );
    // With a valid session and CSRF token (the sign-out form's), the post is still refused.
    let csrf = queues.csrf();
    let refused = officer
        .post(
            "/admin/queues/retry",
            &[("csrf", &csrf), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(refused.status, 403);
    assert!(is_dead(&env, &job_id).await, "nothing was retried");
    assert_eq!(env.queued("sync_catalog").await, 0);
    let denied = eventually(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM security_events WHERE type = 'permission_denied'
              AND details->>'scope' = 'platform:admin' AND email = $1",
        )
        .bind(OFFICER)
        .fetch_one(&env.pool)
        .await
        .is_ok_and(|n| n == 1)
    })
    .await;
    assert!(denied, "the refusal is a permission_denied event");

    let mut agent = Agent::new(&server);
    assert_eq!(agent.login(ADMIN, PASSWORD).await.status, 303);
    let queues = agent.get("/admin/queues").await;
    assert!(queues.body.contains("/admin/queues/retry"));
    let csrf = queues.csrf();
    let right = agent
        .post(
            "/admin/queues/retry",
            &[("csrf", &csrf), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(right.status, 303, "{}", right.body);
    assert!(!is_dead(&env, &job_id).await);
    assert_eq!(env.queued("sync_catalog").await, 1, "back on its queue");

    // Losing platform:admin takes the button away from the next request.
    gatehouse::principals::set_platform_role(
        &env.pool,
        &mut env.redis.clone(),
        &gatehouse::access::ScopeCache::new(env.namespace.clone()),
        ADMIN,
        Some(PlatformRole::SecurityOfficer),
    )
    .await
    .expect("role changed");
    let again = agent
        .post(
            "/admin/queues/retry",
            &[("csrf", &csrf), ("job_id", &job_id)],
        )
        .await;
    assert_eq!(again.status, 403);
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn users_deactivate_drops_a_dashboard_session_on_its_next_request() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::officer(&server).await;
    assert_eq!(agent.get("/admin").await.status, 200);
    gatehouse::principals::set_user_active(
        &env.pool,
        &mut env.redis.clone(),
        &gatehouse::access::ScopeCache::new(env.namespace.clone()),
        OFFICER,
        false,
    )
    .await
    .expect("deactivated");
    let page = agent.get("/admin/queues").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/admin/login");
    assert_eq!(session_keys(&env).await, 0, "the session is gone");
    // Signing in again answers as a wrong password does.
    let mut again = Agent::new(&server);
    let refused = again.login(OFFICER, PASSWORD).await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("The email or password is not valid."));
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn hostile_tenant_names_emails_and_error_texts_render_inert() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let initiator = create_user(&env, "initiator@example.com", None).await;
    let tenant = gatehouse::tenants::create(
        &env.pool,
        &env.config.keyring,
        &NewTenant {
            name: HOSTILE.into(),
            twilio_account_sid: ACCOUNT_SID.into(),
            twilio_auth_token: SecretString::from(TOKEN.to_owned()),
            store_url: None,
            store_api_key: None,
            webhook_shared_key: None,
            owner_email: None,
        },
    )
    .await
    .expect("tenant");
    sqlx::query(
        "INSERT INTO security_events (type, ip, email, tenant_id, details)
         VALUES ('invalid_webhook_signature', '203.0.113.9', $1, $2, '{}'),
                ('failed_login', '203.0.113.9', $1, NULL, '{}')",
    )
    .bind(format!("\"><svg onload=alert(2)>{HOSTILE}@x.example"))
    .bind(tenant)
    .execute(&env.pool)
    .await
    .expect("events");
    sqlx::query(
        "INSERT INTO key_rotations (status, initiated_by, target_key_id, expires_at, total, done, failed, last_error)
         VALUES ('running', $1, '0123456789abcdef', now() + interval '1 hour', 100, 40, 2, $2)",
    )
    .bind(initiator)
    .bind(HOSTILE)
    .execute(&env.pool)
    .await
    .expect("rotation");
    let job_id = dead_job(&env).await;
    env.set_job_meta("sync_catalog", &job_id, "last_error", HOSTILE)
        .await;

    let server = env.start_server().await;
    let mut agent = Agent::officer(&server).await;
    let mut seen = 0;
    for path in PAGES {
        let page = agent.get(path).await;
        assert_eq!(page.status, 200, "{path}");
        // Escaped text holds no '<', so every '<' opens a real tag: none may be hostile.
        for tag in tags(&page.body) {
            let tag = tag.to_ascii_lowercase();
            assert!(
                !tag.starts_with("<script") && !tag.starts_with("<img"),
                "{path}: {tag}"
            );
            assert!(
                !tag.contains("onerror") && !tag.contains("onload"),
                "{path}: {tag}"
            );
            assert!(
                !tag.starts_with("<svg onload") && !tag.starts_with("<b>"),
                "{path}: {tag}"
            );
        }
        if page
            .body
            .contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;")
            || page
                .body
                .contains("&lt;script&gt;alert(\"x\")&lt;/script&gt;")
        {
            seen += 1;
        }
    }
    // The name (webhooks), the email (events, auth), the errors (queues, rotations) all showed.
    assert!(
        seen >= 4,
        "the hostile text is shown, escaped, on {seen} pages"
    );
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn logout_deletes_the_session_server_side_and_needs_its_token() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::officer(&server).await;
    let page = agent.get("/admin").await;
    let csrf = page.csrf();
    let stolen = agent.cookies["__Host-gh_admin"].clone();

    // A forged logout (no token) changes nothing.
    assert_eq!(agent.post("/admin/logout", &[]).await.status, 403);
    assert_eq!(session_keys(&env).await, 1);

    let out = agent.post("/admin/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location(), "/admin/login");
    assert!(
        !agent.cookies.contains_key("__Host-gh_admin"),
        "cookie cleared"
    );
    assert_eq!(session_keys(&env).await, 0, "gone from Redis");
    // A copy of the old cookie opens nothing.
    agent.cookies.insert("__Host-gh_admin".into(), stolen);
    let replay = agent.get("/admin").await;
    assert_eq!(replay.status, 303);
    assert_eq!(replay.location(), "/admin/login");
    server.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_session_past_its_absolute_lifetime_is_gone_however_busy() {
    let env = TestEnv::new().await;
    create_user(&env, OFFICER, Some(PlatformRole::SecurityOfficer)).await;
    let server = env.start_server().await;
    let mut agent = Agent::officer(&server).await;
    assert_eq!(agent.get("/admin").await.status, 200);
    // Pretend it was created 12 hours and a minute ago (it stayed busy: the idle TTL is fresh).
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:admin:session:*", env.namespace))
        .query_async(&mut redis)
        .await
        .expect("keys");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let _: () = redis::cmd("HSET")
        .arg(&keys[0])
        .arg("created")
        .arg(now - 12 * 3600 - 60)
        .query_async(&mut redis)
        .await
        .expect("hset");
    let page = agent.get("/admin").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/admin/login");
    assert_eq!(session_keys(&env).await, 0, "deleted when found expired");
    server.stop().await;
    env.cleanup().await;
}

// ------------------------------------------------------------------ real Chromium

/// Seeds what the dashboard shows: events of every kind over several hours and days, failed
/// logins from a few addresses, tenants (one failing its signatures), a dead job and a
/// rotation in progress.
async fn seed(env: &TestEnv) -> String {
    let initiator = create_user(
        env,
        "initiator@example.com",
        Some(PlatformRole::SecurityOfficer),
    )
    .await;
    let mut tenants = Vec::new();
    for name in ["Acme Outdoor", "Blue Fern Books", "Corner Café <b>&</b>"] {
        let id = gatehouse::tenants::create(
            &env.pool,
            &env.config.keyring,
            &NewTenant {
                name: name.into(),
                twilio_account_sid: ACCOUNT_SID.into(),
                twilio_auth_token: SecretString::from(TOKEN.to_owned()),
                store_url: None,
                store_api_key: None,
                webhook_shared_key: None,
                owner_email: None,
            },
        )
        .await
        .expect("tenant");
        tenants.push(id);
    }
    // Every kind, spread over the last 40 hours.
    sqlx::query(
        "INSERT INTO security_events (type, occurred_at, ip, email, tenant_id, details)
         SELECT k.kind,
                now() - make_interval(hours => ((g * 7 + k.n * 3) % 40)::int, mins => (g % 60)::int),
                ('198.51.100.' || (1 + (g % 5)))::inet,
                'user' || (g % 4) || '@example.com',
                CASE WHEN k.kind = 'invalid_webhook_signature' THEN $1::uuid END,
                CASE WHEN k.kind = 'rate_limit_exceeded'
                     THEN jsonb_build_object('limit', (ARRAY['auth_ip','failed_login','user'])[1 + g % 3])
                     ELSE '{}'::jsonb END
           FROM generate_series(1, 30) AS g,
                (SELECT kind, row_number() OVER () AS n FROM unnest(ARRAY[
                    'failed_login', 'permission_denied', 'invalid_webhook_signature',
                    'rate_limit_exceeded', 'suspicious_activity', 'four_eyes_violation',
                    'encryption_error', 'key_rotation_started', 'key_rotation_completed']) AS kind) AS k
          WHERE g <= CASE k.kind WHEN 'failed_login' THEN 30 WHEN 'rate_limit_exceeded' THEN 24
                                 WHEN 'permission_denied' THEN 12 ELSE 4 END",
    )
    .bind(tenants[2])
    .execute(&env.pool)
    .await
    .expect("events");
    // Failed logins over a week, heavier at night, mostly from one address.
    sqlx::query(
        "INSERT INTO security_events (type, occurred_at, ip, email, details)
         SELECT 'failed_login',
                date_trunc('day', now()) - make_interval(days => (g % 7)::int)
                    + make_interval(hours => (CASE WHEN g % 3 = 0 THEN 1 + g % 4 ELSE (g * 5) % 24 END)::int),
                CASE WHEN g % 3 = 0 THEN '203.0.113.7' ELSE '203.0.113.' || (g % 9) END::inet,
                'victim' || (g % 6) || '@example.com', '{}'
           FROM generate_series(1, 160) AS g
          WHERE date_trunc('day', now()) - make_interval(days => (g % 7)::int)
                    + make_interval(hours => (CASE WHEN g % 3 = 0 THEN 1 + g % 4 ELSE (g * 5) % 24 END)::int) < now()",
    )
    .execute(&env.pool)
    .await
    .expect("failed logins");
    sqlx::query(
        "INSERT INTO key_rotations (status, initiated_by, target_key_id, created_at, expires_at, started_at, total, done, failed)
         VALUES ('running', $1, '0123456789abcdef', now() - interval '20 minutes', now() + interval '1 hour',
                 now() - interval '15 minutes', 12000, 7300, 12),
                ('completed', $1, 'fedcba9876543210', now() - interval '3 days', now() - interval '2 days',
                 now() - interval '3 days', 9000, 9000, 0)",
    )
    .bind(initiator)
    .execute(&env.pool)
    .await
    .expect("rotations");
    let dead = dead_job(env).await;
    // A backlog waiting for a worker (none runs from here on).
    let mut redis = env.redis.clone();
    for _ in 0..7 {
        env.queues()
            .enqueue(
                &mut redis,
                &gatehouse_jobs::RotateKeys {
                    rotation_id: Uuid::new_v4(),
                },
                Enqueue::default(),
            )
            .await
            .expect("enqueue");
    }
    dead
}

/// Asserts the browser arrives at `url` (waiting for a click's navigation to land).
async fn at(browser: &webdriver::Browser, url: String) {
    assert_eq!(browser.wait_for_url(&url).await, url);
}

fn shots_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// An attacker's page on another loopback port: a form that posts a retry to the dashboard
/// without a token. (127.0.0.1 on two ports is same-site, so the Strict cookie goes along;
/// the CSRF checks are what must refuse it.)
async fn attacker(
    target: &str,
    job_id: &str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let page = format!(
        "<!doctype html><html><body><h1>You won a prize</h1>\
         <form method=\"post\" action=\"{target}/admin/queues/retry\">\
         <input type=\"hidden\" name=\"job_id\" value=\"{job_id}\">\
         <button id=\"claim\" type=\"submit\">Claim</button></form></body></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind attacker");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_chromium_logs_in_renders_every_chart_and_refuses_a_cross_site_retry() {
    let env = TestEnv::with_vars(|vars| {
        vars.insert("DEBUG".into(), "true".into());
    })
    .await;
    // A platform admin: it reads every page and may press Retry.
    create_user(&env, ADMIN, Some(PlatformRole::PlatformAdmin)).await;
    let job_id = seed(&env).await;
    let server = env.start_server().await;
    let base = format!("http://{}", server.addr);
    let shots = shots_dir();
    let browser = webdriver::Browser::start().await;

    // Not signed in: the login form.
    browser.goto(&format!("{base}/admin")).await;
    at(&browser, format!("{base}/admin/login")).await;
    browser.screenshot(&shots.join("login.png")).await;
    let email = browser.find("#email").await;
    browser.type_into(&email, ADMIN).await;
    let password = browser.find("#password").await;
    browser.type_into(&password, PASSWORD).await;
    browser.click(&browser.find("#signin").await).await;
    at(&browser, format!("{base}/admin")).await;

    // Chromium took the __Host- cookie over http://127.0.0.1 (loopback counts as secure).
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "__Host-gh_admin")
        .unwrap_or_else(|| panic!("the browser keeps the session cookie: {cookies:?}"));
    assert_eq!(session["secure"], true);
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert_eq!(session["path"], "/");

    for (path, shot, min_charts) in [
        ("/admin", "events.png", 1),
        ("/admin/auth", "failed-auth.png", 2),
        ("/admin/rate-limits", "rate-limits.png", 3),
        ("/admin/webhooks", "webhooks.png", 1),
        ("/admin/queues", "queues.png", 2),
        ("/admin/rotations", "rotations.png", 2),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        at(&browser, format!("{base}{path}")).await;
        let charts = browser.find_all("svg.chart").await;
        assert!(
            charts.len() >= min_charts,
            "{path}: {} charts",
            charts.len()
        );
        for chart in &charts {
            let rect = browser.rect(chart).await;
            assert!(
                rect.width > 50.0 && rect.height > 10.0,
                "{path}: chart drawn at {rect:?}"
            );
        }
        // Data made it into the charts: coloured shapes with a size.
        let shapes = browser
            .find_all("svg.chart rect.bar, svg.chart rect.cell, svg.chart rect.done")
            .await;
        assert!(!shapes.is_empty(), "{path}: no bars");
        let mut drawn = 0;
        for shape in shapes.iter().take(40) {
            let r = browser.rect(shape).await;
            if r.width > 0.0 && r.height > 0.0 {
                drawn += 1;
            }
        }
        assert!(drawn > 0, "{path}: every bar is empty");
        // The stylesheet applied (the CSP allows it): the header is dark.
        let header = browser.find("header.top").await;
        assert!(browser.rect(&header).await.height > 20.0);
        browser.screenshot(&shots.join(shot)).await;
    }

    // The heatmap has 7 × 24 cells and some are hot.
    browser.goto(&format!("{base}/admin/auth")).await;
    assert_eq!(
        browser.find_all("svg.heatmap rect.cell").await.len(),
        7 * 24
    );
    let top = browser.text(&browser.find("#top-ips").await).await;
    assert!(top.contains("203.0.113.7"), "{top}");

    // A tenant name with markup shows as text.
    browser.goto(&format!("{base}/admin/webhooks")).await;
    let table = browser.text(&browser.find("#webhooks").await).await;
    assert!(table.contains("Corner Café <b>&</b>"), "{table}");
    assert!(table.contains("failing"), "{table}");

    // Cross-site: the attacker's form posts without a token and is refused.
    let (evil, evil_task) = attacker(&base, &job_id).await;
    browser.goto(&format!("http://{evil}/")).await;
    browser.click(&browser.find("#claim").await).await;
    at(&browser, format!("{base}/admin/queues/retry")).await;
    let refused = browser.source().await;
    assert!(refused.contains("403 Forbidden"), "{refused}");
    browser.screenshot(&shots.join("csrf-refused.png")).await;
    assert!(
        is_dead(&env, &job_id).await,
        "the cross-site post retried nothing"
    );
    assert_eq!(
        csrf_events(&env, 1).await,
        1,
        "the refusal is a security event"
    );
    assert_eq!(env.queued("sync_catalog").await, 0);

    // The dashboard's own retry button works.
    browser.goto(&format!("{base}/admin/queues")).await;
    browser
        .click(&browser.find("form.retry button").await)
        .await;
    at(&browser, format!("{base}/admin/queues?notice=retried")).await;
    assert!(!is_dead(&env, &job_id).await);
    assert_eq!(env.queued("sync_catalog").await, 1);

    // Sign out: the session is gone and the dashboard asks for a login again.
    browser
        .click(&browser.find("form.logout button").await)
        .await;
    at(&browser, format!("{base}/admin/login")).await;
    assert_eq!(session_keys(&env).await, 0);
    browser.goto(&format!("{base}/admin")).await;
    at(&browser, format!("{base}/admin/login")).await;

    browser.quit();
    evil_task.abort();
    eprintln!("screenshots in {}", shots.display());
    server.stop().await;
    env.cleanup().await;
}
