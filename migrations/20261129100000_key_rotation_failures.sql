-- Values a key rotation could not open: counted once in key_rotations.failed, left untouched,
-- and skipped by later batches of the same rotation (so a rotation with unreadable values
-- still finishes, and a redelivered job never counts them twice).
CREATE TABLE key_rotation_failures (
    rotation_id  uuid NOT NULL REFERENCES key_rotations (id) ON DELETE CASCADE,
    table_name   text NOT NULL,
    column_name  text NOT NULL,
    row_id       uuid NOT NULL,
    reason       text NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rotation_id, table_name, column_name, row_id)
);

-- Who approved, on the rotation row itself too (the approvals table stays the single-use
-- record; these columns let readers such as the dashboard show both people in one query).
ALTER TABLE key_rotations ADD COLUMN approved_by uuid REFERENCES users (id);
ALTER TABLE key_rotations ADD COLUMN approved_at timestamptz;
