-- Owner invitations (SPEC "Tenant boundary"): `tenants create --owner-email E` and
-- `POST /v1/tenants` with `owner_email` no longer make whichever account holds E the owner;
-- they issue a single-use, expiring token, shown once. Only its SHA-256 hash is stored, so a
-- copy of this table lets nobody accept an invitation. `email` is the operator's record of
-- whom it was issued for: holding that address grants nothing. Accepting locks the row
-- (`FOR UPDATE`) and sets `accepted_at`/`accepted_by` in the transaction that makes the
-- accepting user an owner, so a token is used at most once.
CREATE TABLE tenant_invitations (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email        text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    token_hash   bytea NOT NULL CHECK (octet_length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    accepted_at  timestamptz,
    accepted_by  uuid REFERENCES users (id) ON DELETE SET NULL,
    CHECK (expires_at > created_at)
);
CREATE UNIQUE INDEX tenant_invitations_token_hash_key ON tenant_invitations (token_hash);
CREATE INDEX tenant_invitations_tenant_idx ON tenant_invitations (tenant_id);

-- A new security event kind, `invitation_accepted` (who became an owner of which tenant, by
-- which invitation). Expand-only: every kind the previous release writes is still allowed.
ALTER TABLE security_events DROP CONSTRAINT security_events_type_check;
ALTER TABLE security_events ADD CONSTRAINT security_events_type_check
    CHECK (type IN ('failed_login', 'permission_denied', 'invalid_webhook_signature',
                    'rate_limit_exceeded', 'suspicious_activity', 'four_eyes_violation',
                    'encryption_error', 'key_rotation_started', 'key_rotation_completed',
                    'invitation_accepted'));
