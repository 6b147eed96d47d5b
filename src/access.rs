//! Who may do what: roles, their scopes, and the principal behind a token, resolved per
//! request through a versioned Redis cache.
//!
//! Cache key (under the queue namespace): one hash per subject, `{ns}:scopes:{id}`, so every
//! operation touches one key and the cache runs unchanged on a Redis Cluster. Its field
//! `version` holds the subject's version `n` (missing = 0), `entry` the principal loaded from
//! PostgreSQL and `entry_version` the version it was loaded under; an entry counts only while
//! `entry_version` equals `version`. A fill stores its entry only if the version is still the
//! one read before loading (a compare-and-set script) and gives the hash
//! [`CACHE_TTL_SECONDS`] to live; when it expires the version goes with the entry, which is
//! safe: any fill in flight then compares against a version that moved. A role change bumps the version
//! once before its transaction commits (so that a change cannot commit while Redis cannot
//! be told) and once after (so that an entry filled from the old rows in between is never
//! read again): a request that starts after the change has returned reads a version whose
//! entry, if any, was loaded after the commit. With Redis unreachable, scopes come straight
//! from PostgreSQL — never a default, never "allow".

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::security::jwt::SubjectKind;

/// How long a cached principal lives (bounds the life of an entry a lost bump left behind).
pub const CACHE_TTL_SECONDS: u64 = 300;

/// A permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "platform:admin")]
    PlatformAdmin,
    #[serde(rename = "jobs:enqueue")]
    JobsEnqueue,
    #[serde(rename = "keys:rotate")]
    KeysRotate,
    #[serde(rename = "security:read")]
    SecurityRead,
    #[serde(rename = "tenant:admin")]
    TenantAdmin,
    #[serde(rename = "catalog:sync")]
    CatalogSync,
    #[serde(rename = "conversations:read")]
    ConversationsRead,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::PlatformAdmin,
        Scope::JobsEnqueue,
        Scope::KeysRotate,
        Scope::SecurityRead,
        Scope::TenantAdmin,
        Scope::CatalogSync,
        Scope::ConversationsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PlatformAdmin => "platform:admin",
            Scope::JobsEnqueue => "jobs:enqueue",
            Scope::KeysRotate => "keys:rotate",
            Scope::SecurityRead => "security:read",
            Scope::TenantAdmin => "tenant:admin",
            Scope::CatalogSync => "catalog:sync",
            Scope::ConversationsRead => "conversations:read",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    /// Scopes a service account may hold: platform-wide ones that need no human
    /// (`keys:rotate` needs two people; tenant scopes come with a membership).
    pub fn grantable_to_service(self) -> bool {
        matches!(
            self,
            Scope::JobsEnqueue | Scope::SecurityRead | Scope::PlatformAdmin
        )
    }
}

/// A role within one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantRole {
    Owner,
    Admin,
    Agent,
}

impl TenantRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantRole::Owner => "owner",
            TenantRole::Admin => "admin",
            TenantRole::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<TenantRole> {
        match s {
            "owner" => Some(TenantRole::Owner),
            "admin" => Some(TenantRole::Admin),
            "agent" => Some(TenantRole::Agent),
            _ => None,
        }
    }

    pub fn scopes(self) -> &'static [Scope] {
        match self {
            TenantRole::Owner | TenantRole::Admin => &[
                Scope::TenantAdmin,
                Scope::CatalogSync,
                Scope::ConversationsRead,
            ],
            TenantRole::Agent => &[Scope::ConversationsRead],
        }
    }
}

/// A platform-wide role of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformRole {
    PlatformAdmin,
    SecurityOfficer,
    Service,
}

impl PlatformRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformRole::PlatformAdmin => "platform_admin",
            PlatformRole::SecurityOfficer => "security_officer",
            PlatformRole::Service => "service",
        }
    }

    pub fn parse(s: &str) -> Option<PlatformRole> {
        match s {
            "platform_admin" => Some(PlatformRole::PlatformAdmin),
            "security_officer" => Some(PlatformRole::SecurityOfficer),
            "service" => Some(PlatformRole::Service),
            _ => None,
        }
    }

    pub fn scopes(self) -> &'static [Scope] {
        match self {
            PlatformRole::PlatformAdmin => &[Scope::PlatformAdmin, Scope::JobsEnqueue],
            PlatformRole::SecurityOfficer => &[Scope::KeysRotate, Scope::SecurityRead],
            PlatformRole::Service => &[Scope::JobsEnqueue],
        }
    }
}

/// One tenant membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub tenant_id: Uuid,
    pub role: TenantRole,
}

/// Who a request acts for, as of the moment it was loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub id: Uuid,
    pub kind: SubjectKind,
    pub email: Option<String>,
    pub active: bool,
    pub platform_scopes: Vec<Scope>,
    pub memberships: Vec<Membership>,
    /// Producers (service accounts) only: the account may enqueue for every tenant
    /// (`--all-tenants`). No serde default: an entry cached before this field existed does
    /// not parse, so it is reloaded from PostgreSQL instead of being read as unbound.
    pub all_tenants: bool,
    /// Producers only: the tenants named with `--tenant`.
    pub bound_tenants: Vec<Uuid>,
}

impl Principal {
    pub fn has_platform_scope(&self, scope: Scope) -> bool {
        self.active && self.platform_scopes.contains(&scope)
    }

    pub fn tenant_role(&self, tenant_id: Uuid) -> Option<TenantRole> {
        self.memberships
            .iter()
            .find(|m| m.tenant_id == tenant_id)
            .map(|m| m.role)
    }

    /// Whether the principal may act as a producer (`POST /v1/jobs/{queue}`) for `tenant_id`,
    /// given that it holds `jobs:enqueue`: a service account for the tenants it is bound to
    /// (or all, with `--all-tenants`); a user through `platform:admin` (platform-wide by role)
    /// or through a membership of that tenant (a `service` user with no membership is bound
    /// to no tenant).
    pub fn may_produce_for(&self, tenant_id: Uuid) -> bool {
        if !self.active {
            return false;
        }
        match self.kind {
            SubjectKind::Service => self.all_tenants || self.bound_tenants.contains(&tenant_id),
            SubjectKind::User => {
                self.has_platform_scope(Scope::PlatformAdmin)
                    || self.tenant_role(tenant_id).is_some()
            }
        }
    }

    /// Whether the principal holds `scope` in `tenant_id` through a membership.
    pub fn has_tenant_scope(&self, tenant_id: Uuid, scope: Scope) -> bool {
        self.active
            && self
                .tenant_role(tenant_id)
                .is_some_and(|role| role.scopes().contains(&scope))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the scope cache (Redis) cannot be updated: {0}")]
    Cache(#[from] redis::RedisError),
    #[error("no such tenant or user")]
    NotFound,
    #[error("{0}")]
    Conflict(&'static str),
    /// The actor may not make this change (the owner rules, checked in the transaction).
    #[error("not allowed")]
    Forbidden,
}

/// Loads a principal from PostgreSQL; `None` when the subject does not exist.
pub async fn load(
    conn: &mut PgConnection,
    id: Uuid,
    kind: SubjectKind,
) -> Result<Option<Principal>, sqlx::Error> {
    match kind {
        SubjectKind::User => {
            let row: Option<(String, bool, Option<String>)> =
                sqlx::query_as("SELECT email, is_active, platform_role FROM users WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((email, active, platform_role)) = row else {
                return Ok(None);
            };
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT tenant_id, role FROM memberships WHERE user_id = $1 ORDER BY tenant_id",
            )
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
            let memberships = rows
                .into_iter()
                .filter_map(|(tenant_id, role)| {
                    TenantRole::parse(&role).map(|role| Membership { tenant_id, role })
                })
                .collect();
            let platform_scopes = platform_role
                .as_deref()
                .and_then(PlatformRole::parse)
                .map(|r| r.scopes().to_vec())
                .unwrap_or_default();
            Ok(Some(Principal {
                id,
                kind,
                email: Some(email),
                active,
                platform_scopes,
                memberships,
                all_tenants: false,
                bound_tenants: Vec::new(),
            }))
        }
        SubjectKind::Service => {
            let row: Option<(bool, Vec<String>, bool)> = sqlx::query_as(
                "SELECT is_active, scopes, all_tenants FROM service_accounts WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            let Some((active, scopes, all_tenants)) = row else {
                return Ok(None);
            };
            let bound_tenants: Vec<Uuid> = sqlx::query_scalar(
                "SELECT tenant_id FROM service_account_tenants WHERE service_account_id = $1
                 ORDER BY tenant_id",
            )
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
            let platform_scopes = scopes
                .iter()
                .filter_map(|s| Scope::parse(s))
                .filter(|s| s.grantable_to_service())
                .collect();
            Ok(Some(Principal {
                id,
                kind,
                email: None,
                active,
                platform_scopes,
                memberships: Vec::new(),
                all_tenants,
                bound_tenants,
            }))
        }
    }
}

/// The scope cache.
#[derive(Debug, Clone)]
pub struct ScopeCache {
    namespace: String,
}

/// Stores a loaded principal if the subject's version is still the one read before loading.
/// KEYS[1]: the subject's hash. ARGV: the version read, the entry (JSON), the TTL in seconds.
static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"#!lua
local v = redis.call('HGET', KEYS[1], 'version') or '0'
if v ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'entry', ARGV[2], 'entry_version', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// Where a principal came from (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Database,
    /// Redis failed; loaded from PostgreSQL without the cache.
    DatabaseFallback,
}

impl ScopeCache {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    /// The subject's cache hash.
    fn key(&self, id: Uuid) -> String {
        format!("{}:scopes:{id}", self.namespace)
    }

    /// The principal `id`, from the cache when its current version is there, else from
    /// PostgreSQL (and then cached under the version read before loading).
    pub async fn resolve<C: ConnectionLike + Send>(
        &self,
        redis: &mut C,
        pool: &PgPool,
        id: Uuid,
        kind: SubjectKind,
    ) -> Result<(Option<Principal>, Source), sqlx::Error> {
        let key = self.key(id);
        // (version, the entry if it was loaded under that version)
        let cached: Result<(String, Option<String>), redis::RedisError> = redis::cmd("HMGET")
            .arg(&key)
            .arg("version")
            .arg("entry")
            .arg("entry_version")
            .query_async(redis)
            .await
            .map(
                |(version, entry, entry_version): (
                    Option<String>,
                    Option<String>,
                    Option<String>,
                )| {
                    let version = version.unwrap_or_else(|| "0".to_owned());
                    let entry = entry.filter(|_| entry_version.as_deref() == Some(&*version));
                    (version, entry)
                },
            );
        let version = match cached {
            Ok((version, Some(entry))) => {
                if let Ok(principal) = serde_json::from_str::<Principal>(&entry)
                    && principal.id == id
                    && principal.kind == kind
                {
                    return Ok((Some(principal), Source::Cache));
                }
                Some(version)
            }
            Ok((version, None)) => Some(version),
            Err(error) => {
                tracing::warn!(%error, "scope cache unreachable; resolving scopes from PostgreSQL");
                None
            }
        };
        let mut conn = pool.acquire().await?;
        let principal = load(&mut conn, id, kind).await?;
        let Some(version) = version else {
            return Ok((principal, Source::DatabaseFallback));
        };
        if let Some(p) = &principal
            && let Ok(json) = serde_json::to_string(p)
        {
            let stored: Result<i64, redis::RedisError> = FILL
                .key(&key)
                .arg(&version)
                .arg(json)
                .arg(CACHE_TTL_SECONDS)
                .invoke_async(redis)
                .await;
            if let Err(error) = stored {
                tracing::warn!(%error, "cannot fill the scope cache");
            }
        }
        Ok((principal, Source::Database))
    }

    /// Bumps `id`'s version: every cached entry of it is dead from now on.
    pub async fn bump<C: ConnectionLike + Send>(
        &self,
        redis: &mut C,
        id: Uuid,
    ) -> Result<i64, redis::RedisError> {
        redis::cmd("HINCRBY")
            .arg(self.key(id))
            .arg("version")
            .arg(1)
            .query_async(redis)
            .await
    }
}

/// Who asks for a membership change, as far as the owner rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A platform admin: may set any role (how a tenant gets an owner through the API).
    PlatformAdmin,
    /// A member of the tenant: must be an `owner` or `admin` of it when the change commits;
    /// only an owner grants `owner` or changes an owner's role.
    Member(Uuid),
}

/// Adds `user_id` to `tenant_id` with `role`, or changes its role, for `actor`. The tenant
/// always keeps an owner. Everything the owner rules read (the actor's role, the target's
/// current role) is read inside the transaction, under the tenant's row lock that every
/// membership change takes first, so no concurrent change can slip between the check and the
/// write. Bumps the member's scope version before and after the commit (see the module docs);
/// fails without changing anything when Redis cannot take the first bump.
pub async fn set_member_role<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    cache: &ScopeCache,
    actor: Actor,
    tenant_id: Uuid,
    user_id: Uuid,
    role: TenantRole,
) -> Result<(), AccessError> {
    let mut tx = pool.begin().await?;
    // Lock the tenant so two concurrent changes cannot both remove the last owner.
    let tenant: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Actor::Member(actor_id) = actor {
        let actor_role = member_role(&mut tx, tenant_id, actor_id).await?;
        let target_role = member_role(&mut tx, tenant_id, user_id).await?;
        let allowed = match actor_role {
            Some(TenantRole::Owner) => true,
            Some(TenantRole::Admin) => {
                role != TenantRole::Owner && target_role != Some(TenantRole::Owner)
            }
            Some(TenantRole::Agent) | None => false,
        };
        if !allowed {
            return Err(AccessError::Forbidden);
        }
    }
    let user: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    if tenant.is_none() || user.is_none() {
        return Err(AccessError::NotFound);
    }
    sqlx::query(
        "INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = EXCLUDED.role, updated_at = now()",
    )
    .bind(tenant_id)
    .bind(user_id)
    .bind(role.as_str())
    .execute(&mut *tx)
    .await?;
    let owners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM memberships WHERE tenant_id = $1 AND role = 'owner'",
    )
    .bind(tenant_id)
    .fetch_one(&mut *tx)
    .await?;
    if owners == 0 {
        return Err(AccessError::Conflict(
            "the tenant must keep at least one owner",
        ));
    }
    bump_scope_version(&mut tx, redis, cache, user_id).await?;
    tx.commit().await?;
    bump_after_commit(redis, cache, user_id).await;
    Ok(())
}

/// `user_id`'s role in `tenant_id`, its membership row locked for the transaction.
async fn member_role(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    user_id: Uuid,
) -> Result<Option<TenantRole>, sqlx::Error> {
    let role: Option<String> = sqlx::query_scalar(
        "SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE",
    )
    .bind(tenant_id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(role.as_deref().and_then(TenantRole::parse))
}

/// Why the first scope bump failed.
#[derive(Debug, thiserror::Error)]
pub enum BumpError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the scope cache (Redis) cannot be updated: {0}")]
    Cache(#[from] redis::RedisError),
}

impl From<BumpError> for AccessError {
    fn from(error: BumpError) -> Self {
        match error {
            BumpError::Database(e) => AccessError::Database(e),
            BumpError::Cache(e) => AccessError::Cache(e),
        }
    }
}

/// The first half of a scope change's bookkeeping, inside its transaction: the user's
/// `scope_version` column, then the cache version (see the module docs). An error here must
/// abort the transaction.
pub async fn bump_scope_version<C: ConnectionLike + Send>(
    conn: &mut PgConnection,
    redis: &mut C,
    cache: &ScopeCache,
    user_id: Uuid,
) -> Result<(), BumpError> {
    sqlx::query(
        "UPDATE users SET scope_version = scope_version + 1, updated_at = now() WHERE id = $1",
    )
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    cache.bump(redis, user_id).await?;
    Ok(())
}

/// The second half, after the commit: retires an entry filled from the old rows in between.
pub async fn bump_after_commit<C: ConnectionLike + Send>(
    redis: &mut C,
    cache: &ScopeCache,
    user_id: Uuid,
) {
    if let Err(error) = cache.bump(redis, user_id).await {
        // The first bump already retired every entry older than this change; only an entry
        // filled between that bump and the commit can linger, for at most the cache TTL.
        tracing::error!(user.id = %user_id, %error, "cannot bump the scope version after a role change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_carry_the_scopes_spec_lists() {
        let names = |s: &[Scope]| s.iter().map(|s| s.as_str()).collect::<Vec<_>>();
        assert_eq!(
            names(TenantRole::Admin.scopes()),
            ["tenant:admin", "catalog:sync", "conversations:read"]
        );
        assert_eq!(names(TenantRole::Agent.scopes()), ["conversations:read"]);
        assert_eq!(TenantRole::Owner.scopes(), TenantRole::Admin.scopes());
        assert_eq!(
            names(PlatformRole::PlatformAdmin.scopes()),
            ["platform:admin", "jobs:enqueue"]
        );
        assert_eq!(
            names(PlatformRole::SecurityOfficer.scopes()),
            ["keys:rotate", "security:read"]
        );
        assert_eq!(names(PlatformRole::Service.scopes()), ["jobs:enqueue"]);
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
            let json = serde_json::to_string(&scope).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", scope.as_str()));
        }
        assert_eq!(Scope::parse("admin"), None);
    }

    #[test]
    fn producers_act_for_their_bound_tenants_users_through_membership_or_platform_admin() {
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut service = Principal {
            id: Uuid::new_v4(),
            kind: SubjectKind::Service,
            email: None,
            active: true,
            platform_scopes: vec![Scope::JobsEnqueue],
            memberships: Vec::new(),
            all_tenants: false,
            bound_tenants: vec![mine],
        };
        assert!(service.may_produce_for(mine));
        assert!(!service.may_produce_for(other));
        service.all_tenants = true;
        assert!(service.may_produce_for(other));
        service.active = false;
        assert!(!service.may_produce_for(mine));
        let mut user = Principal {
            kind: SubjectKind::User,
            active: true,
            all_tenants: true, // ignored for users
            bound_tenants: Vec::new(),
            memberships: vec![Membership {
                tenant_id: mine,
                role: TenantRole::Agent,
            }],
            ..service
        };
        assert!(user.may_produce_for(mine));
        assert!(!user.may_produce_for(other));
        user.platform_scopes = PlatformRole::PlatformAdmin.scopes().to_vec();
        assert!(user.may_produce_for(other));
    }

    #[test]
    fn an_entry_cached_before_tenant_bindings_is_not_read_as_unbound() {
        // What the previous release cached: no all_tenants / bound_tenants. It must not parse
        // (resolve then reloads from PostgreSQL) rather than default to "bound to nothing" or
        // "all".
        let old = serde_json::json!({
            "id": Uuid::nil(), "kind": "service", "email": null, "active": true,
            "platform_scopes": ["jobs:enqueue"], "memberships": [],
        });
        assert!(serde_json::from_value::<Principal>(old).is_err());
    }

    #[test]
    fn an_inactive_principal_holds_nothing() {
        let tenant = Uuid::new_v4();
        let mut p = Principal {
            id: Uuid::new_v4(),
            kind: SubjectKind::User,
            email: None,
            active: true,
            platform_scopes: vec![Scope::PlatformAdmin],
            memberships: vec![Membership {
                tenant_id: tenant,
                role: TenantRole::Admin,
            }],
            all_tenants: false,
            bound_tenants: Vec::new(),
        };
        assert!(p.has_platform_scope(Scope::PlatformAdmin));
        assert!(p.has_tenant_scope(tenant, Scope::CatalogSync));
        assert!(!p.has_tenant_scope(Uuid::new_v4(), Scope::CatalogSync));
        p.active = false;
        assert!(!p.has_platform_scope(Scope::PlatformAdmin));
        assert!(!p.has_tenant_scope(tenant, Scope::CatalogSync));
    }
}
