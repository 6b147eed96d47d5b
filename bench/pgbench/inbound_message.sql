-- The statement one inbound_message job commits, for pgbench: generated from
-- gatehouse::conversations::STORE_INBOUND by `gatehouse-bench pgbench-script` (a test checks
-- it is current). Figure 1 runs it against the bench database as
--   pgbench -n -M prepared -c 4 -j 2 -t N -D tenant=<tenant id> -D form=<blind index form> \
--           -f bench/pgbench/inbound_message.sql <database>
-- where the tenant exists; by hand, any tenant id of a migrated database will do.
\set customer random(0, 199)
\set jid random(1, 9000000000000000000)
WITH marker AS (
    INSERT INTO processed_jobs (job_id, queue, worker)
    SELECT ('pgbench-' || :jid::text), 'inbound_message'::text, 'pgbench'::text WHERE EXISTS (SELECT 1 FROM tenants WHERE id = :tenant::uuid)
    ON CONFLICT DO NOTHING
    RETURNING job_id
), fresh AS (
    SELECT 1 FROM marker
    WHERE NOT EXISTS (SELECT 1 FROM messages WHERE tenant_id = :tenant::uuid AND message_sid = ('SM' || :jid::text))
), found AS (
    SELECT id FROM conversations
    WHERE tenant_id = :tenant::uuid AND customer_number_index = ANY(ARRAY[sha256(('v2.conversations-' || :customer::text)::bytea), sha256(('v1.conversations-' || :customer::text)::bytea)]::bytea[])
    ORDER BY array_position(ARRAY[sha256(('v2.conversations-' || :customer::text)::bytea), sha256(('v1.conversations-' || :customer::text)::bytea)]::bytea[], customer_number_index)
    LIMIT 1
), upd AS (
    UPDATE conversations AS c SET
        low_confidence_count = CASE WHEN false THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN false AND c.low_confidence_count + 1 >= 3::int4 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, '2026-11-28T22:00:00Z'::timestamptz),
        updated_at = now()
    FROM fresh
    WHERE c.id = (SELECT id FROM found)
    RETURNING c.id, c.low_confidence_count, c.state
), ins AS (
    INSERT INTO conversations AS c (id, tenant_id, customer_number, customer_number_index,
                                    customer_number_index_form,
                                    low_confidence_count, state, last_message_at)
    SELECT gen_random_uuid(), :tenant::uuid, substring(sha256(('n' || :jid::text)::bytea) || sha256(('n.' || :jid::text)::bytea) from 1 for 49), sha256(('v2.conversations-' || :customer::text)::bytea), :form::text,
           CASE WHEN false THEN 1 ELSE 0 END,
           CASE WHEN false AND 1 >= 3::int4 THEN 'handoff' ELSE 'bot' END,
           '2026-11-28T22:00:00Z'::timestamptz
    FROM fresh
    WHERE NOT EXISTS (SELECT 1 FROM found)
    ON CONFLICT (tenant_id, customer_number_index) DO UPDATE SET
        low_confidence_count = CASE WHEN false THEN c.low_confidence_count + 1 ELSE 0 END,
        state = CASE WHEN false AND c.low_confidence_count + 1 >= 3::int4 THEN 'handoff'
                     ELSE c.state END,
        last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at),
        updated_at = now()
    RETURNING c.id, c.low_confidence_count, c.state
), conv AS (
    SELECT * FROM upd UNION ALL SELECT * FROM ins
), msg AS (
    INSERT INTO messages (id, tenant_id, conversation_id, message_sid, from_number,
                          from_number_index, from_number_index_form, to_number, body, intent,
                          confidence, slots, classifier, rejected_reason, job_id, received_at)
    SELECT gen_random_uuid(), :tenant::uuid, conv.id, ('SM' || :jid::text), substring(sha256(('f' || :jid::text)::bytea) || sha256(('f.' || :jid::text)::bytea) from 1 for 49), sha256(('v2.messages-' || :customer::text)::bytea), :form::text, '+14155550199'::text, 'Hi! Where is my order #12345? It was supposed to arrive yesterday.'::text, 'order_status'::text, 0.9::float8, '{}'::jsonb, 'rules'::text, NULL::text, ('pgbench-' || :jid::text), '2026-11-28T22:00:00Z'::timestamptz
    FROM conv
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM tenants WHERE id = :tenant::uuid),
       EXISTS (SELECT 1 FROM marker),
       (SELECT id FROM msg),
       (SELECT id FROM conv),
       (SELECT low_confidence_count FROM conv),
       (SELECT state FROM conv);
