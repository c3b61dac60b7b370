-- A claim that starts where the worker's last claim ended.
--
-- Every claim walked the claim index from its start. Once a job is claimed
-- its entry there points at a dead row version, which a later scan skips
-- and marks dead, so normally the walk is short. While another session
-- holds a transaction open (a long report, a forgotten psql, a replica's
-- hot_standby_feedback), no row version the claims left behind can be
-- removed or its entry marked dead, and each claim walked over the entries
-- of every job claimed since that transaction began: 90 ms a claim once
-- 830,000 were done, a drain of 1,000,000 jobs at 2,222 jobs/s instead of
-- 28,000.
--
-- The worker now passes the claim order's key of the last job it claimed
-- (`after_priority`, `after_run_at`, `after_id`), and the claim first looks
-- only past it, at the same priority. It falls back to the whole queue for
-- what that finds short of the count: when the run at that priority is
-- over, the claim is the full claim it always was. Jobs that sort before
-- the key but become due later (a higher priority, a job handed back, an
-- enqueue that committed late) are found by the full claims the worker
-- makes regularly (see `QueueStorage` in the engine's storage.rs). Without
-- a key the claim is the full claim.
--
-- The key needs an order with no ties: the claim index gains `id` (jobs
-- enqueued in one transaction share their `run_at`), and replaces apalis's
-- `idx_apalis_jobs_fetch_partial`, whose predicate it repeats word for word.
-- (Built without CONCURRENTLY, as migrations run in a transaction: writers
-- of the jobs table wait for the build, a few seconds per million rows.)
CREATE INDEX IF NOT EXISTS jobs_claim_order ON apalis.jobs (
    job_type,
    priority DESC,
    run_at ASC,
    id ASC
)
WHERE
    status = 'Pending'
    OR (
        status = 'Failed'
        AND attempts < max_attempts
    );

DROP INDEX IF EXISTS apalis.idx_apalis_jobs_fetch_partial;

-- The three-argument claim stays callable (a worker of the version before
-- this one, during a rolling upgrade): the key's arguments default to none.
DROP FUNCTION IF EXISTS apalis.get_jobs(TEXT, TEXT, INTEGER);

CREATE OR REPLACE FUNCTION apalis.get_jobs(
    worker_id TEXT,
    v_job_type TEXT,
    v_job_count INTEGER DEFAULT 5,
    after_priority INTEGER DEFAULT NULL,
    after_run_at TIMESTAMPTZ DEFAULT NULL,
    after_id TEXT DEFAULT NULL
)
RETURNS SETOF apalis.jobs
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    control apalis.queue_controls;
    picked text[] := '{}';
BEGIN
    PERFORM 1 FROM apalis.workers WHERE id = worker_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker % is not registered: it claims nothing', quote_literal(worker_id)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT * INTO control FROM apalis.queue_controls WHERE queue = v_job_type FOR UPDATE;
    IF NOT FOUND THEN
        IF after_id IS NOT NULL THEN
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
                    AND priority = after_priority
                    AND (run_at, id) > (after_run_at, after_id)
                ORDER BY priority DESC, run_at ASC, id ASC
                LIMIT v_job_count
                FOR UPDATE SKIP LOCKED
            ) AS due;
        END IF;
        IF cardinality(picked) < v_job_count THEN
            -- Rows this transaction locked above are not skipped as locked.
            SELECT picked || coalesce(array_agg(due.id), '{}') INTO picked
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
                    AND id <> ALL (picked)
                ORDER BY priority DESC, run_at ASC, id ASC
                LIMIT v_job_count - cardinality(picked)
                FOR UPDATE SKIP LOCKED
            ) AS due;
        END IF;
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
