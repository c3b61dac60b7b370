-- A claim reads no job that is not yet due.
--
-- The claim's look at the whole queue (`ORDER BY priority DESC, run_at, id`
-- with `run_at < now()`) could only bound its walk of the claim index by
-- the queue: `run_at` comes after `priority` in the index, so the scan read
-- every waiting entry of the queue until it found enough due ones. A queue
-- with 100,000 jobs scheduled an hour ahead and none due read all 100,000
-- at every claim: 10-35 ms a claim, 30,000,000 rows a second for a worker
-- polling every 50 ms (`storage::a_worker_over_100_000_jobs_not_yet_due_…`).
--
-- It now (`apalis.pick_due_jobs`, which the limited queues' picker without
-- key concurrency uses too) takes the queue's priorities one at a time,
-- from the highest: the highest priority of a waiting job (one probe of the
-- index), the due jobs at that priority (a range of the index that ends at
-- the first job not yet due), and the next lower priority only if the
-- claim is still short. The order of what it claims is the same; a claim
-- reads a few entries per priority that has waiting jobs (usually one or
-- two priorities, never more than there are). The look past the worker's
-- last claim is unchanged.

-- Up to `v_job_count` due jobs of queue `v_job_type` in claim order, locked
-- (skipping rows other claims hold), appended to `picked` (whose ids it
-- leaves out): priority by priority from the highest, each a range of the
-- claim index from the first waiting job the probe for that priority saw
-- (so entries of dead rows before it are walked once, by the probe, not
-- twice) to the first job not yet due. A job committed between the probe
-- and the range that sorts before the probe's is the next claim's.
CREATE OR REPLACE FUNCTION apalis.pick_due_jobs(
    v_job_type TEXT,
    v_job_count INTEGER,
    picked TEXT [] DEFAULT '{}'
)
RETURNS TEXT []
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    level integer;
    level_run_at timestamptz;
    level_id text;
BEGIN
    IF cardinality(picked) >= v_job_count THEN
        RETURN picked;
    END IF;
    SELECT priority, run_at, id INTO level, level_run_at, level_id
    FROM apalis.jobs
    WHERE
        (
            status = 'Pending'
            OR (
                status = 'Failed'
                AND attempts < max_attempts
            )
        )
        AND job_type = v_job_type
    ORDER BY priority DESC, run_at ASC, id ASC
    LIMIT 1;
    WHILE level IS NOT NULL LOOP
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
                AND priority = level
                AND (run_at, id) >= (level_run_at, level_id)
                AND id <> ALL (picked)
            ORDER BY priority DESC, run_at ASC, id ASC
            LIMIT v_job_count - cardinality(picked)
            FOR UPDATE SKIP LOCKED
        ) AS due;
        EXIT WHEN cardinality(picked) >= v_job_count;
        SELECT priority, run_at, id INTO level, level_run_at, level_id
        FROM apalis.jobs
        WHERE
            (
                status = 'Pending'
                OR (
                    status = 'Failed'
                    AND attempts < max_attempts
                )
            )
            AND job_type = v_job_type
            AND priority < level
        ORDER BY priority DESC, run_at ASC, id ASC
        LIMIT 1;
    END LOOP;
    RETURN picked;
END;
$$;

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
        -- The rest from the whole queue (rows locked above are not skipped
        -- as locked, so they are passed to be left out).
        picked := apalis.pick_due_jobs(v_job_type, v_job_count, picked);
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

-- The limited queues' picker, restated whole to take a queue without key
-- concurrency's due jobs the same way (its one statement was a generic plan
-- of a sequential scan and a sort once another queue's jobs filled the
-- table: 10 ms a claim of an empty limited queue beside 100,000 jobs).
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
    v_wanted integer;
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
        WHERE job_type = v_job_type AND limited AND status IN ('Queued', 'Running');
        v_limit := least(v_limit, greatest(v_concurrency - v_in_flight, 0));
    END IF;
    v_wanted := v_limit;
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
        picked := apalis.pick_due_jobs(v_job_type, v_limit);
    ELSE
        -- Round-robin across keys: each key's first due job, then each
        -- key's second, ..., a key's in-flight jobs counting against its
        -- `key_concurrency`. The keys come from a loose index scan (one
        -- probe per key with due work), each key's head from its index
        -- range. A job without a key is a key of its own, taken from among
        -- the queue's first 1,000 due jobs (a queue with key concurrency
        -- has few such jobs; searching all due jobs for them cost a scan).
        WITH RECURSIVE keys AS (
            (SELECT concurrency_key AS key FROM apalis.jobs
             WHERE job_type = v_job_type AND concurrency_key IS NOT NULL
               AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
               AND run_at < now()
             ORDER BY concurrency_key LIMIT 1)
            UNION ALL
            SELECT (SELECT concurrency_key FROM apalis.jobs
                    WHERE job_type = v_job_type AND concurrency_key > keys.key
                      AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
                      AND run_at < now()
                    ORDER BY concurrency_key LIMIT 1)
            FROM keys WHERE keys.key IS NOT NULL
        ),
        open_keys AS (
            SELECT keys.key, (SELECT count(*) FROM apalis.jobs AS running
                              WHERE running.job_type = v_job_type
                                AND running.concurrency_key = keys.key
                                AND running.limited
                                AND running.status IN ('Queued', 'Running')) AS busy
            FROM keys WHERE keys.key IS NOT NULL
        ),
        candidates AS (
            SELECT heads.id, heads.priority, heads.run_at, heads.n + open_keys.busy AS place
            FROM open_keys
            CROSS JOIN LATERAL (
                SELECT head.*, row_number() OVER (ORDER BY head.priority DESC, head.run_at ASC) AS n
                FROM (
                    SELECT jobs.id, jobs.priority, jobs.run_at FROM apalis.jobs
                    WHERE jobs.job_type = v_job_type AND jobs.concurrency_key = open_keys.key
                      AND (jobs.status = 'Pending' OR (jobs.status = 'Failed' AND jobs.attempts < jobs.max_attempts))
                      AND jobs.run_at < now()
                    ORDER BY jobs.priority DESC, jobs.run_at ASC
                    LIMIT least(v_key - open_keys.busy, v_limit)
                ) AS head
            ) AS heads
            WHERE open_keys.busy < v_key
            UNION ALL
            SELECT first.id, first.priority, first.run_at, 1 FROM (
                SELECT jobs.id, jobs.priority, jobs.run_at, jobs.concurrency_key FROM apalis.jobs
                WHERE (jobs.status = 'Pending' OR (jobs.status = 'Failed' AND jobs.attempts < jobs.max_attempts))
                  AND jobs.run_at < now()
                  AND jobs.job_type = v_job_type
                ORDER BY jobs.priority DESC, jobs.run_at ASC
                LIMIT 1000
            ) AS first
            WHERE first.concurrency_key IS NULL
        ),
        chosen AS (
            SELECT id FROM candidates
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
        -- The bucket, not the queue, ran out: wake the queue's workers in
        -- every process when its next token comes.
        IF cardinality(picked) = v_limit AND v_limit < v_wanted THEN
            PERFORM pg_notify('apalis::job::insert', json_build_object(
                'job_type', v_job_type,
                'due_in', (1 - (v_tokens - cardinality(picked))) / v_rate)::text);
        END IF;
    END IF;
    RETURN picked;
END;
$$;
