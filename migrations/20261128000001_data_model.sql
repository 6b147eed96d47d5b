-- gatehouse data model. Forward-only: never edit a landed migration, add a new one.
-- Sealed columns (BYTEA) hold the AES-256-GCM envelope:
--   0x01 | key id (8) | nonce (12) | ciphertext | tag (16), AAD "{table}.{column}:{id}".
-- *_index columns hold blind indexes (HMAC-SHA256 keyed from SECRET_KEY).

CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL CHECK (email = lower(btrim(email)) AND length(email) BETWEEN 3 AND 320),
    password_hash  text NOT NULL,
    first_name     text NOT NULL,
    last_name      text NOT NULL,
    platform_role  text CHECK (platform_role IN ('platform_admin', 'security_officer', 'service')),
    is_active      boolean NOT NULL DEFAULT true,
    -- bumped whenever the user's roles change; the Redis scope cache is keyed by it
    scope_version  bigint NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (email);

CREATE TABLE service_accounts (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    client_id    text NOT NULL UNIQUE,
    secret_hash  text NOT NULL,
    scopes       text[] NOT NULL DEFAULT '{}',
    is_active    boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                   text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    twilio_account_sid     text NOT NULL CHECK (twilio_account_sid ~ '^AC[0-9a-fA-F]{32}$'),
    twilio_auth_token      bytea NOT NULL,          -- sealed
    store_url              text,
    store_api_key          bytea,                   -- sealed
    webhook_shared_key_id  text,
    webhook_shared_key     bytea,                   -- sealed
    -- bumped when any verification key changes, so ingress caches drop stale keys
    keys_version           bigint NOT NULL DEFAULT 1,
    last_synced_at         timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CHECK ((webhook_shared_key_id IS NULL) = (webhook_shared_key IS NULL))
);

CREATE TABLE memberships (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'agent')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE conversations (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id              uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    customer_number        bytea NOT NULL,          -- sealed
    customer_number_index  bytea NOT NULL,          -- blind index
    state                  text NOT NULL DEFAULT 'bot' CHECK (state IN ('bot', 'handoff')),
    low_confidence_count   integer NOT NULL DEFAULT 0 CHECK (low_confidence_count >= 0),
    last_message_at        timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, customer_number_index)
);

CREATE TABLE messages (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id          uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    conversation_id    uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    message_sid        text NOT NULL,
    direction          text NOT NULL DEFAULT 'inbound' CHECK (direction IN ('inbound', 'outbound')),
    from_number        bytea NOT NULL,              -- sealed
    from_number_index  bytea NOT NULL,              -- blind index
    to_number          text NOT NULL,
    body               text NOT NULL,
    intent             text NOT NULL CHECK (intent IN ('greeting', 'product_question', 'order_status',
                           'place_order', 'cancel_order', 'complaint', 'human_handoff', 'other')),
    confidence         double precision NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
    slots              jsonb NOT NULL DEFAULT '{}'::jsonb,
    classifier         text NOT NULL,
    rejected_reason    text,
    job_id             text NOT NULL,
    received_at        timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, message_sid)
);
CREATE INDEX messages_conversation_idx ON messages (conversation_id, received_at);

CREATE TABLE products (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    external_id  text NOT NULL,
    sku          text,
    name         text NOT NULL,
    description  text,
    price_cents  bigint CHECK (price_cents >= 0),
    currency     text CHECK (currency ~ '^[A-Z]{3}$'),
    in_stock     boolean,
    url          text,
    synced_at    timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, external_id)
);

CREATE TABLE security_events (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    type         text NOT NULL CHECK (type IN ('failed_login', 'permission_denied',
                     'invalid_webhook_signature', 'rate_limit_exceeded', 'suspicious_activity',
                     'four_eyes_violation', 'encryption_error', 'key_rotation_started',
                     'key_rotation_completed')),
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    ip           inet,
    user_id      uuid,
    email        text,
    tenant_id    uuid,
    request_id   text,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX security_events_time_idx ON security_events (occurred_at DESC);
CREATE INDEX security_events_type_time_idx ON security_events (type, occurred_at DESC);

-- One row per job whose effect committed; written in the job's own transaction, so a
-- redelivered job finds it and changes nothing.
CREATE TABLE processed_jobs (
    job_id        text PRIMARY KEY,
    queue         text NOT NULL,
    worker        text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

-- Jobs that start from a database write: committed with the write, relayed to Redis.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    queue       text NOT NULL,
    job_id      text NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text
);
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE sent_at IS NULL;

CREATE TABLE key_rotations (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status         text NOT NULL DEFAULT 'pending_approval' CHECK (status IN ('pending_approval',
                       'queued', 'running', 'completed', 'failed', 'expired')),
    initiated_by   uuid NOT NULL REFERENCES users (id),
    target_key_id  text NOT NULL CHECK (target_key_id ~ '^[0-9a-f]{16}$'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    started_at     timestamptz,
    completed_at   timestamptz,
    total          bigint NOT NULL DEFAULT 0,
    done           bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    last_error     text
);

-- Four-eyes: one approval per rotation (single use), never by its initiator.
CREATE TABLE key_rotation_approvals (
    rotation_id   uuid PRIMARY KEY REFERENCES key_rotations (id) ON DELETE CASCADE,
    approved_by   uuid NOT NULL REFERENCES users (id),
    initiated_by  uuid NOT NULL REFERENCES users (id),
    approved_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (approved_by <> initiated_by)
);
