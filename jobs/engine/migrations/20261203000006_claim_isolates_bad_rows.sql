-- A claim that one bad row cannot stall. A row that breaks a constraint
-- added NOT VALID over it (reachable only by DDL) made the claim's one UPDATE
-- fail for its whole batch, and the worker restarted every lease without ever
-- running a job of that queue. After such a failure the worker claims again
-- through `apalis.claim_isolating_bad_rows`: row by row, each in its own
-- subtransaction, ending each row that cannot be updated alone, as the claim
-- already ends rows it cannot decode. The batch claim stays the fast path.

-- Rows that cannot even be marked dead (every new version of them breaks the
-- constraint) are moved here, whole, with the reason.
CREATE TABLE IF NOT EXISTS apalis.quarantined_jobs (LIKE apalis.jobs);
ALTER TABLE apalis.quarantined_jobs
    ADD COLUMN IF NOT EXISTS quarantined_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS reason text NOT NULL DEFAULT '';

-- Ends job `job_id`, which cannot be claimed for `reason`: dead with the
-- reason, or, if even that update breaks the constraint, quarantined.
CREATE OR REPLACE FUNCTION apalis.end_unclaimable_job(job_id text, reason text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
AS $$
BEGIN
    BEGIN
        UPDATE apalis.jobs
        SET status = 'Killed', done_at = now(), lock_by = NULL, lock_at = NULL, unique_key = NULL,
            last_result = jsonb_build_object('Err', 'job row cannot be claimed: ' || reason)
        WHERE id = job_id;
        RAISE WARNING 'job % cannot be claimed (%): it is dead', job_id, reason;
        RETURN;
    EXCEPTION WHEN integrity_constraint_violation THEN
        NULL; -- not even that: quarantine it below
    END;
    BEGIN
        INSERT INTO apalis.quarantined_jobs
        SELECT jobs.*, now(), 'job row cannot be claimed: ' || reason
        FROM apalis.jobs WHERE id = job_id;
        DELETE FROM apalis.jobs WHERE id = job_id;
        RAISE WARNING 'job % cannot be claimed (%) nor marked dead: moved to apalis.quarantined_jobs',
            job_id, reason;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'job % cannot be claimed (%) and could not be quarantined (%): it stays',
            job_id, reason, SQLERRM;
    END;
END;
$$;

-- The claim of `apalis.get_jobs` (same rows, same order, same marks), one row
-- at a time.
CREATE OR REPLACE FUNCTION apalis.claim_isolating_bad_rows(
    worker_id TEXT,
    v_job_type TEXT,
    v_job_count INTEGER DEFAULT 5
)
RETURNS SETOF apalis.jobs
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    candidate text;
    claimed apalis.jobs;
    took boolean;
    reason text;
BEGIN
    PERFORM 1 FROM apalis.workers WHERE id = worker_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker % is not registered: it claims nothing', quote_literal(worker_id)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    FOR candidate IN
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
    LOOP
        took := false;
        BEGIN
            UPDATE apalis.jobs j
            SET status = 'Queued', lock_by = worker_id, lock_at = now(), unique_key = NULL
            WHERE j.id = candidate
            RETURNING j.* INTO claimed;
            took := FOUND;
        EXCEPTION WHEN integrity_constraint_violation THEN
            reason := SQLERRM;
        END;
        IF took THEN
            RETURN NEXT claimed;
        ELSIF reason IS NOT NULL THEN
            PERFORM apalis.end_unclaimable_job(candidate, reason);
            reason := NULL;
        END IF;
    END LOOP;
END;
$$;
