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

-- The new security event kind `invitation_accepted` needs no constraint change here:
-- 20261205020000 checks kinds for form instead of listing them.
