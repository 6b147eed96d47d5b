-- Job payloads in Redis that a key rotation could not re-seal (no configured key opens them),
-- recorded once per rotation and job, like key_rotation_failures for sealed columns: the
-- rotation counts them in `failed`, reports each as an encryption_error event once, and its
-- later passes skip them. Names the job, never its content.
CREATE TABLE key_rotation_job_failures (
    rotation_id uuid NOT NULL REFERENCES key_rotations (id) ON DELETE CASCADE,
    queue text NOT NULL,
    job_id text NOT NULL,
    reason text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rotation_id, queue, job_id)
);
