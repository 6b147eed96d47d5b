-- Tenant secret rotation (issue 15): the previous Twilio auth token and webhook shared key,
-- sealed like the current ones (AAD column names `twilio_auth_token_previous` and
-- `webhook_shared_key_previous`), each accepted until its `_until` time. Expand only: the
-- previous release ignores these columns.
ALTER TABLE tenants
    ADD COLUMN twilio_auth_token_previous        bytea,
    ADD COLUMN twilio_auth_token_previous_until  timestamptz,
    ADD COLUMN webhook_shared_key_previous_id    text,
    ADD COLUMN webhook_shared_key_previous       bytea,
    ADD COLUMN webhook_shared_key_previous_until timestamptz;

-- Security event kinds are the application's (`events::EventType`); the table keeps them
-- well-formed instead of listing them, so a release that adds a kind needs no constraint
-- change.
-- contract: the dropped CHECK only listed kinds; the previous release writes only kinds of its
-- list, all of which the new format check accepts.
DO $$
DECLARE c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'security_events'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%type%'
    LOOP
        EXECUTE format('ALTER TABLE security_events DROP CONSTRAINT %I', c.conname);
    END LOOP;
END $$;
ALTER TABLE security_events
    ADD CONSTRAINT security_events_type_format CHECK (type ~ '^[a-z][a-z_]{0,62}$');
