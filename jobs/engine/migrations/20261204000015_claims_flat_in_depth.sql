-- A claim that costs the same with 20,000 or 1,000,000 jobs waiting.
--
-- The claim of a queue without limits updated the rows of a CTE (`... LIMIT
-- v_job_count FOR UPDATE SKIP LOCKED`) joined to the table by id. Its generic
-- plan, the one the worker's bookkeeping sessions use, cannot know the limit
-- and takes it for a tenth of the table, so it joined the CTE to the table
-- by hashing a sequential scan of all of it: nothing for an empty queue,
-- 3 ms for 20,000 rows, 300 ms for each claim of 100 with 1,000,000 waiting
-- (330 jobs/s). The due ids now go into an array first and the update finds
-- them by primary key (`= ANY`), as the claim under limits already did.
-- The condition is still the claim index's predicate, word for word.
CREATE OR REPLACE FUNCTION apalis.get_jobs(
    worker_id TEXT,
    v_job_type TEXT,
    v_job_count INTEGER DEFAULT 5
)
RETURNS SETOF apalis.jobs
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    control apalis.queue_controls;
    picked text[];
BEGIN
    PERFORM 1 FROM apalis.workers WHERE id = worker_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker % is not registered: it claims nothing', quote_literal(worker_id)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT * INTO control FROM apalis.queue_controls WHERE queue = v_job_type FOR UPDATE;
    IF NOT FOUND THEN
        SELECT coalesce(array_agg(due.id), '{}') INTO picked
        FROM (
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
        ) AS due;
        IF cardinality(picked) = 0 THEN
            RETURN;
        END IF;
        RETURN QUERY
        UPDATE apalis.jobs j
        SET
            status = 'Queued',
            lock_by = worker_id,
            lock_at = now(),
            unique_key = NULL
        WHERE j.id = ANY (picked)
        RETURNING j.*;
        RETURN;
    END IF;
    picked := apalis.pick_limited_jobs(control, v_job_count);
    RETURN QUERY
    UPDATE apalis.jobs j
    SET status = 'Queued', lock_by = worker_id, lock_at = now(), unique_key = NULL, limited = true
    WHERE j.id = ANY (picked)
    RETURNING j.*;
END;
$$;
