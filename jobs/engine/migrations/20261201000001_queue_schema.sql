-- The engine's part of the queue schema, on top of apalis-postgres's tables.
--
-- Written to be re-run safely: a database whose app built parts of this
-- before the engine existed gets the rest.

-- Unique jobs: at most one pending job per (job_type, unique_key). The claim
-- clears the key (get_jobs below), so only unclaimed jobs hold one.
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS unique_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_unique_pending
    ON apalis.jobs (job_type, unique_key) WHERE unique_key IS NOT NULL;

-- Rows a worker can always run. apalis-postgres's row decoder rejects an id
-- that is not a ULID, a NULL metadata value or a run_at before 1970, and
-- failed the whole claimed batch over one such row; ids must be canonical
-- (upper-case) ULIDs, since results are recorded by the id's canonical text.
-- Existing rows that break a check move to apalis.rejected_jobs first.
CREATE TABLE IF NOT EXISTS apalis.rejected_jobs (
    id text NOT NULL,
    job_type text,
    reason text NOT NULL,
    row_data jsonb NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'jobs_attempts_in_range') THEN
        WITH rejected AS (
            DELETE FROM apalis.jobs
            WHERE id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'
               OR array_position(avals(metadata), NULL) IS NOT NULL
               OR run_at < '1970-01-01 00:00:00+00'
               OR attempts < 0
               OR max_attempts < 1
            RETURNING *
        )
        INSERT INTO apalis.rejected_jobs (id, job_type, reason, row_data)
        SELECT id, job_type,
               CASE
                   WHEN id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$' THEN 'id is not a canonical ULID'
                   WHEN array_position(avals(metadata), NULL) IS NOT NULL THEN 'metadata holds a NULL value'
                   WHEN run_at < '1970-01-01 00:00:00+00' THEN 'run_at is before 1970'
                   ELSE 'attempts below 0 or max_attempts below 1'
               END,
               to_jsonb(rejected) - 'job' || jsonb_build_object('job_base64', encode(job, 'base64'))
        FROM rejected;
        ALTER TABLE apalis.jobs
            ADD CONSTRAINT jobs_run_at_after_1970 CHECK (run_at >= '1970-01-01 00:00:00+00'),
            ADD CONSTRAINT jobs_attempts_in_range CHECK (attempts >= 0 AND max_attempts >= 1);
    END IF;
END;
$$;

-- The id and metadata checks are a trigger, not CHECK constraints: a CHECK is
-- evaluated on every update, and every job is updated three times (claim,
-- start, result; measured: a regular expression and avals() on each of them
-- cost the drain 15-25 %), while neither column changes after the insert
-- except by a merge.
CREATE OR REPLACE FUNCTION apalis.refuse_unrunnable_rows() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$' THEN
        RAISE EXCEPTION 'job row refused: id % is not a canonical (upper-case) ULID', quote_literal(NEW.id)
            USING ERRCODE = 'check_violation';
    END IF;
    IF array_position(avals(NEW.metadata), NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'job row refused: its metadata holds a NULL value'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS jobs_refuse_unrunnable_rows ON apalis.jobs;
CREATE TRIGGER jobs_refuse_unrunnable_rows
BEFORE INSERT OR UPDATE OF id, metadata ON apalis.jobs
FOR EACH ROW
EXECUTE FUNCTION apalis.refuse_unrunnable_rows();

-- apalis-postgres's first migration created lidx (lock_by) and unique_job_id
-- (id); later ones added the same indexes again and kept these. Every status
-- change writes to every index (measured: claims 16 % and result rounds 20 %
-- cheaper without them).
DROP INDEX IF EXISTS apalis.lidx;
DROP INDEX IF EXISTS apalis.unique_job_id;

-- The one definition of a job's state, for operators and the runtime:
-- apalis's statuses plus run_at and attempts ("Failed" with attempts left is
-- a job waiting for its retry), and whether it is due (claimable now).
DROP VIEW IF EXISTS public.job_states;
DROP VIEW IF EXISTS apalis.job_states;
CREATE VIEW apalis.job_states AS
SELECT
    jobs.*,
    CASE
        WHEN status = 'Pending' AND run_at > now() THEN 'scheduled'
        WHEN status = 'Pending' THEN 'pending'
        WHEN status = 'Failed' AND attempts < max_attempts THEN 'scheduled'
        WHEN status = 'Queued' THEN 'claimed'
        WHEN status = 'Running' THEN 'running'
        WHEN status = 'Done' THEN 'done'
        ELSE 'dead'
    END AS state,
    (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
        AND run_at < now() AS due
FROM apalis.jobs;

-- A job handed back unstarted at a graceful shutdown keeps its attempts:
-- apalis counts one for each claimed job it returns, so a few deploys in a row
-- could kill a job that never ran. Only that hand-back is undone, recognised
-- by apalis's message; a lease expiry still counts (the job may have started).
CREATE OR REPLACE FUNCTION apalis.keep_attempts_of_unstarted_jobs() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.attempts := OLD.attempts;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS keep_attempts_of_unstarted_jobs ON apalis.jobs;
CREATE TRIGGER keep_attempts_of_unstarted_jobs
BEFORE UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    OLD.status = 'Queued'
    AND NEW.status = 'Pending'
    AND NEW.attempts > OLD.attempts
    AND NEW.last_result ->> 'Err' = 'Re-enqueued due to worker shutdown'
)
EXECUTE FUNCTION apalis.keep_attempts_of_unstarted_jobs();

-- 1. Claims with a cached plan. apalis-postgres 1.0 defines get_jobs as a
--    LANGUAGE sql function, which Postgres re-plans on every call (measured:
--    3.3 ms per claim of 10, against 0.7 ms in PL/pgSQL, which keeps the
--    plan). Same signature and statement, plus: a claimed job gives up its
--    unique key, so the next enqueue with that key starts a new job, and no
--    later status change (recovery, retry) can conflict with it.
--    When upgrading apalis-postgres, check whether it redefines get_jobs.
CREATE OR REPLACE FUNCTION apalis.get_jobs(
    worker_id TEXT,
    v_job_type TEXT,
    v_job_count INTEGER DEFAULT 5
)
RETURNS SETOF apalis.jobs
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    RETURN QUERY
    WITH jobs AS (
        SELECT id
        FROM apalis.jobs
        WHERE
            (
                status = 'Pending'
                OR (
                    status = 'Failed'
                    AND attempts < max_attempts
                )
            )
            AND run_at < now()
            AND job_type = v_job_type
        ORDER BY priority DESC, run_at ASC
        LIMIT v_job_count
        FOR UPDATE SKIP LOCKED
    )
    UPDATE apalis.jobs j
    SET
        status = 'Queued',
        lock_by = worker_id,
        lock_at = now(),
        unique_key = NULL
    FROM jobs
    WHERE j.id = jobs.id
    RETURNING j.*;
END;
$$;
