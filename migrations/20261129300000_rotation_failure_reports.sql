-- When a value a rotation could not open was reported as an `encryption_error` event. The
-- failure row commits with its batch and the event is recorded after, so a run that dies in
-- between leaves the row unreported; the next run of the rotation reports it then. Rows from
-- before this column were reported when they were written.
ALTER TABLE key_rotation_failures ADD COLUMN reported_at timestamptz;
UPDATE key_rotation_failures SET reported_at = failed_at;
