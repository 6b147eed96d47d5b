-- Producers are bound to tenants, and operators can shut a principal out at once.
--
-- service_accounts.all_tenants: an account may enqueue for every tenant. Accounts created
-- before this release were platform-wide, so they keep working: they are marked all-tenants
-- explicitly here (README "review your existing service accounts" says how to replace them with
-- bound ones). The column's default is false, and `service-accounts create` makes the operator
-- choose `--tenant` or `--all-tenants`.
ALTER TABLE service_accounts ADD COLUMN all_tenants boolean NOT NULL DEFAULT false;
UPDATE service_accounts SET all_tenants = true;

-- When the account last got a token at /v1/auth/token (not per request).
ALTER TABLE service_accounts ADD COLUMN last_used_at timestamptz;
-- When `service-accounts revoke` turned it off (is_active = false).
ALTER TABLE service_accounts ADD COLUMN revoked_at timestamptz;

-- The tenants a bound account may enqueue for.
CREATE TABLE service_account_tenants (
    service_account_id  uuid NOT NULL REFERENCES service_accounts (id) ON DELETE CASCADE,
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service_account_id, tenant_id)
);
CREATE INDEX service_account_tenants_tenant_idx ON service_account_tenants (tenant_id);

-- The incident tools' new event kinds need no constraint change here: 20261205020000 checks
-- kinds for form instead of listing them.
