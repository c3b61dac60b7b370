-- Flow control: paused queues and limits that hold across every process,
-- enforced in the claim itself.
--
-- A queue with no row in apalis.queue_controls claims as before (one
-- statement, no lock but the rows'). A queue with a row claims under that
-- row's lock (FOR UPDATE): claims of a limited queue take turns across every
-- worker process, so what they count (jobs claimed or running, tokens) is
-- exact, and a limit is never exceeded whatever the number of processes.

-- The key of `key_concurrency` (Job::concurrency_key), set at enqueue.
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS concurrency_key TEXT;

-- Quarantined rows keep every column, this one too: the move copies the
-- row by name (a new column of apalis.jobs no longer shifts the copy).
ALTER TABLE apalis.quarantined_jobs ADD COLUMN IF NOT EXISTS concurrency_key TEXT;
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
        -- By name through JSON; the hstore `metadata` has no JSON form that
        -- reads back, so it is copied by its own update.
        INSERT INTO apalis.quarantined_jobs
        SELECT (jsonb_populate_record(
            NULL::apalis.quarantined_jobs,
            (to_jsonb(jobs) - 'metadata') || jsonb_build_object(
                'quarantined_at', now(), 'reason', 'job row cannot be claimed: ' || reason)
        )).*
        FROM apalis.jobs WHERE id = job_id;
        UPDATE apalis.quarantined_jobs AS quarantined SET metadata = jobs.metadata
        FROM apalis.jobs WHERE quarantined.id = job_id AND jobs.id = job_id;
        DELETE FROM apalis.jobs WHERE id = job_id;
        RAISE WARNING 'job % cannot be claimed (%) nor marked dead: moved to apalis.quarantined_jobs',
            job_id, reason;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'job % cannot be claimed (%) and could not be quarantined (%): it stays',
            job_id, reason, SQLERRM;
    END;
END;
$$;

CREATE TABLE IF NOT EXISTS apalis.queue_controls (
    queue TEXT PRIMARY KEY,
    -- Starts nothing while set (jobs already running finish).
    paused BOOLEAN NOT NULL DEFAULT false,
    -- What the job type declares (Job::limits), written by each worker
    -- that registers it; NULL: no such limit.
    declared_concurrency INTEGER CHECK (declared_concurrency > 0),
    declared_rate DOUBLE PRECISION CHECK (declared_rate > 0),
    declared_burst INTEGER CHECK (declared_burst > 0),
    declared_key_concurrency INTEGER CHECK (declared_key_concurrency > 0),
    -- An operator's limits (admin::set_limits), in force instead of the
    -- declared ones while `overridden`.
    overridden BOOLEAN NOT NULL DEFAULT false,
    concurrency INTEGER CHECK (concurrency > 0),
    rate DOUBLE PRECISION CHECK (rate > 0),
    burst INTEGER CHECK (burst > 0),
    key_concurrency INTEGER CHECK (key_concurrency > 0),
    -- The token bucket of `rate`: tokens left at `refilled_at`.
    tokens DOUBLE PRECISION,
    refilled_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Ids of up to `v_job_count` due jobs of `v_job_type` that its controls
-- allow to start now, locked (FOR UPDATE SKIP LOCKED) for the caller's
-- claim. Call it only with the queue's control row locked FOR UPDATE (as
-- `control`): it counts what is in flight and takes tokens.
CREATE OR REPLACE FUNCTION apalis.pick_limited_jobs(
    control apalis.queue_controls,
    v_job_count INTEGER
)
RETURNS text[]
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_job_type text := control.queue;
    v_limit integer := v_job_count;
    v_concurrency integer;
    v_rate double precision;
    v_burst integer;
    v_key integer;
    v_in_flight integer;
    v_tokens double precision;
    picked text[];
BEGIN
    IF control.paused THEN
        RETURN '{}';
    END IF;
    IF control.overridden THEN
        v_concurrency := control.concurrency;
        v_rate := control.rate;
        v_burst := control.burst;
        v_key := control.key_concurrency;
    ELSE
        v_concurrency := control.declared_concurrency;
        v_rate := control.declared_rate;
        v_burst := control.declared_burst;
        v_key := control.declared_key_concurrency;
    END IF;
    IF v_concurrency IS NOT NULL THEN
        SELECT count(*) INTO v_in_flight
        FROM apalis.jobs
        WHERE job_type = v_job_type AND status IN ('Queued', 'Running');
        v_limit := least(v_limit, greatest(v_concurrency - v_in_flight, 0));
    END IF;
    IF v_rate IS NOT NULL THEN
        -- A bucket of `burst` tokens (one second's worth if unset), refilled
        -- at `rate` per second; each start takes one.
        v_burst := coalesce(v_burst, greatest(ceil(v_rate)::integer, 1));
        v_tokens := least(
            v_burst::double precision,
            coalesce(control.tokens, v_burst)
                + v_rate * extract(epoch FROM now() - coalesce(control.refilled_at, now()))
        );
        v_limit := least(v_limit, floor(v_tokens)::integer);
    END IF;
    IF v_limit <= 0 THEN
        picked := '{}';
    ELSIF v_key IS NULL THEN
        SELECT coalesce(array_agg(id), '{}') INTO picked FROM (
            SELECT id
            FROM apalis.jobs
            WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
              AND run_at < now()
              AND job_type = v_job_type
            ORDER BY priority DESC, run_at ASC
            LIMIT v_limit
            FOR UPDATE SKIP LOCKED
        ) AS due;
    ELSE
        -- Round-robin across keys: each key's first due job, then each
        -- key's second, ..., a key's in-flight jobs counting against its
        -- `key_concurrency`. A job without a key is a key of its own.
        WITH in_flight AS (
            SELECT concurrency_key, count(*) AS running
            FROM apalis.jobs
            WHERE job_type = v_job_type AND status IN ('Queued', 'Running')
              AND concurrency_key IS NOT NULL
            GROUP BY concurrency_key
        ),
        ranked AS (
            SELECT jobs.id, jobs.priority, jobs.run_at,
                   row_number() OVER (
                       PARTITION BY coalesce(jobs.concurrency_key, jobs.id)
                       ORDER BY jobs.priority DESC, jobs.run_at ASC
                   ) + coalesce(in_flight.running, 0) AS place
            FROM apalis.jobs
            LEFT JOIN in_flight ON in_flight.concurrency_key = jobs.concurrency_key
            WHERE (jobs.status = 'Pending' OR (jobs.status = 'Failed' AND jobs.attempts < jobs.max_attempts))
              AND jobs.run_at < now()
              AND jobs.job_type = v_job_type
        ),
        chosen AS (
            SELECT id FROM ranked
            WHERE place <= v_key
            ORDER BY place, priority DESC, run_at ASC
            LIMIT v_limit
        )
        SELECT coalesce(array_agg(jobs.id), '{}') INTO picked FROM (
            SELECT id FROM apalis.jobs
            WHERE id IN (SELECT id FROM chosen)
            FOR UPDATE SKIP LOCKED
        ) AS jobs;
    END IF;
    IF v_rate IS NOT NULL THEN
        UPDATE apalis.queue_controls
        SET tokens = v_tokens - cardinality(picked), refilled_at = now()
        WHERE queue = v_job_type;
    END IF;
    RETURN picked;
END;
$$;

-- The claim of migration …0005, with the queue's controls: without a
-- control row the same single statement as before.
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
        RETURN;
    END IF;
    picked := apalis.pick_limited_jobs(control, v_job_count);
    RETURN QUERY
    UPDATE apalis.jobs j
    SET status = 'Queued', lock_by = worker_id, lock_at = now(), unique_key = NULL
    WHERE j.id = ANY (picked)
    RETURNING j.*;
END;
$$;

-- The row-by-row claim of migration …0006, with the same controls.
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
    control apalis.queue_controls;
    candidates text[];
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
    SELECT * INTO control FROM apalis.queue_controls WHERE queue = v_job_type FOR UPDATE;
    IF FOUND THEN
        candidates := apalis.pick_limited_jobs(control, v_job_count);
    ELSE
        SELECT coalesce(array_agg(id), '{}') INTO candidates FROM (
            SELECT id
            FROM apalis.jobs
            WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
              AND run_at < now()
              AND job_type = v_job_type
            ORDER BY priority DESC, run_at ASC
            LIMIT v_job_count
            FOR UPDATE SKIP LOCKED
        ) AS due;
    END IF;
    FOREACH candidate IN ARRAY candidates
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
