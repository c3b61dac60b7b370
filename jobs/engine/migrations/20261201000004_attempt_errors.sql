-- Every failed attempt's error, for the job page: `last_result` keeps only
-- the last one. Written by a trigger on the status change that records the
-- failure (whichever statement makes it: a worker's settle, a recovery, the
-- reaper), so only failures pay for it. Pruned with the job.
CREATE TABLE IF NOT EXISTS apalis.job_errors (
    job_id text NOT NULL REFERENCES apalis.jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    error text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS job_errors_job_id ON apalis.job_errors (job_id, attempt);

CREATE OR REPLACE FUNCTION apalis.record_job_error() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO apalis.job_errors (job_id, attempt, error)
    VALUES (NEW.id, NEW.attempts, coalesce(NEW.last_result ->> 'Err', NEW.last_result::text));
    RETURN NULL;
END;
$$;

-- A failed or dead attempt, or one lost with its worker (back to Pending
-- with its attempt counted; a shutdown's hand-back keeps its attempts and
-- is no failure).
DROP TRIGGER IF EXISTS jobs_record_error ON apalis.jobs;
CREATE TRIGGER jobs_record_error
AFTER UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    NEW.last_result ? 'Err'
    AND (NEW.status IN ('Failed', 'Killed')
         OR (NEW.status = 'Pending' AND NEW.attempts > OLD.attempts))
    AND (OLD.status IS DISTINCT FROM NEW.status OR NEW.attempts IS DISTINCT FROM OLD.attempts)
)
EXECUTE FUNCTION apalis.record_job_error();
