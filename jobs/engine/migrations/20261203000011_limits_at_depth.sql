-- Flow control that stays fast with many waiting jobs, and rate limits that
-- reach their rate (the bench of issue 23: with 100,000 waiting jobs a claim
-- under concurrency(1000) took 34 ms, under key_concurrency(1) over 1,000
-- keys 166 ms, and a 200/s bucket let a worker polling each second start 12
-- a second).
--
-- 1. What is in flight is counted through an index, for limited queues
--    only: a claim under limits marks its jobs `limited`, and the partial
--    index holds limited jobs while claimed or running. A queue without
--    limits writes no entry in it (its claims leave `limited` false).
-- 2. key_concurrency ranks each key's first due jobs (a loose index scan
--    over the keys, then each key's head), not every due job of the queue.
-- 3. A claim that the token bucket held back announces when its next token
--    comes (`due_in`), so that every process's worker claims then, not at
--    its next poll.

ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS limited boolean NOT NULL DEFAULT false;
ALTER TABLE apalis.quarantined_jobs ADD COLUMN IF NOT EXISTS limited boolean;

CREATE INDEX IF NOT EXISTS jobs_limited_in_flight ON apalis.jobs (job_type, concurrency_key)
    WHERE limited AND status IN ('Queued', 'Running');

-- Due jobs by key, for key_concurrency: only jobs with a key have entries.
CREATE INDEX IF NOT EXISTS jobs_due_by_key
    ON apalis.jobs (job_type, concurrency_key, priority DESC, run_at ASC)
    WHERE concurrency_key IS NOT NULL
      AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts));

-- Jobs already in flight when a queue gets limits count against them.
CREATE OR REPLACE FUNCTION apalis.count_in_flight_under_limits() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE apalis.jobs SET limited = true
    WHERE job_type = NEW.queue AND status IN ('Queued', 'Running') AND NOT limited;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS queue_controls_created ON apalis.queue_controls;
CREATE TRIGGER queue_controls_created
AFTER INSERT ON apalis.queue_controls
FOR EACH ROW EXECUTE FUNCTION apalis.count_in_flight_under_limits();

DROP TRIGGER IF EXISTS queue_controls_limits_changed ON apalis.queue_controls;
CREATE TRIGGER queue_controls_limits_changed
AFTER UPDATE OF overridden, concurrency, key_concurrency, declared_concurrency,
    declared_key_concurrency ON apalis.queue_controls
FOR EACH ROW
WHEN ((OLD.overridden, OLD.concurrency, OLD.key_concurrency, OLD.declared_concurrency,
       OLD.declared_key_concurrency)
      IS DISTINCT FROM (NEW.overridden, NEW.concurrency, NEW.key_concurrency,
                        NEW.declared_concurrency, NEW.declared_key_concurrency))
EXECUTE FUNCTION apalis.count_in_flight_under_limits();

UPDATE apalis.jobs SET limited = true
WHERE status IN ('Queued', 'Running')
  AND job_type IN (SELECT queue FROM apalis.queue_controls);

-- As in …0007, with the three changes above.
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

-- The claims of …0007, marking what they claim under limits.
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
    SET status = 'Queued', lock_by = worker_id, lock_at = now(), unique_key = NULL, limited = true
    WHERE j.id = ANY (picked)
    RETURNING j.*;
END;
$$;

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
    under_limits boolean;
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
    under_limits := FOUND;
    IF under_limits THEN
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
            SET status = 'Queued', lock_by = worker_id, lock_at = now(), unique_key = NULL,
                limited = under_limits
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
