-- A worker's settle ends its workflow steps together, set by set.
--
-- Until now each step's end ran through the row trigger
-- `jobs_settle_workflow_step` (see 20261201000002_workflows.sql): per step,
-- a plpgsql call, a lookup of its dependents, one UPDATE per dependent, and,
-- per released dependent, a lookup of its dependencies' traceparents, an
-- INSERT (with its own statement-level NOTIFY trigger) and another UPDATE.
-- All of it runs inside the queue's one serial settle: 0.29 ms per step,
-- ten times a plain job's settle (BENCHMARKS.md, "where a workflow step's
-- time goes"). Here a worker's settle is one call of `apalis.record_events`,
-- which updates the jobs as before and then ends every step among them in
-- a handful of statements, whatever their number:
--
-- - the steps are marked done (or dead, or cancelled) in one UPDATE;
-- - their waiting dependents are locked in (workflow, name) order, the one
--   order every settle uses, and counted off in one UPDATE, by as many as
--   this settle ended of their dependencies: a dependent's count reaches
--   zero in exactly one transaction, as before, because each decrement is
--   applied under the row's lock to its latest version;
-- - those at zero are released in one INSERT ... SELECT (one NOTIFY per
--   queue) and one UPDATE;
-- - the rare paths keep the per-step functions: a step that died (its
--   dependents may be cancelled, and theirs, down the graph), a dependent
--   at zero in a cancelled workflow, a workflow with a parent to wake.
--
-- Every other statement that ends a step's job (a recovery, a reaping, an
-- operator's cancel, a cascade from a trigger) still goes through the row
-- trigger: it skips only the UPDATE that `record_events` itself runs, which
-- sets `apalis.steps_ended_by_caller` for just that statement. A statement
-- run by a trigger (depth > 0) is never skipped.

-- Ends the workflow steps of workflows `workflow_ids` whose jobs `job_ids`
-- just ended with `statuses` (`Done`, `Killed`, or `Failed` out of
-- attempts), as `jobs_settle_workflow_step` does for one, with the same
-- outcomes and the same exactly-once release; each step records its last
-- attempt's traceparent (`traceparents`, kept where NULL) and, if it has
-- none yet, its start (`started`).
-- Called by `record_events` only, whose planner settings it runs with.
CREATE OR REPLACE FUNCTION apalis.end_workflow_steps(
    job_ids text[], statuses text[], workflow_ids text[], traceparents text[],
    started timestamptz[]) RETURNS void
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    ended_workflows text[];
    ended_names text[];
    ended_outcomes text[];
    parents_to_wake text[];
    zero_workflows text[];
    zero_names text[];
    zero_cancelled boolean[];
    failed record;
    zero record;
    parent_wf text;
BEGIN
    WITH ended AS (
        SELECT ended.id, ended.traceparent, ended.started,
               CASE WHEN ended.status = 'Done' THEN 'done'
                    WHEN workflows.cancel_requested_at IS NOT NULL THEN 'cancelled'
                    ELSE 'dead' END AS outcome,
               workflows.parent_id IS NOT NULL AS has_parent
        FROM unnest(job_ids, statuses, workflow_ids, traceparents, started)
             AS ended(id, status, workflow_id, traceparent, started)
        JOIN apalis.workflows ON workflows.id = ended.workflow_id
    ), marked AS (
        UPDATE apalis.workflow_steps AS steps
        SET state = ended.outcome, finished_at = now(),
            traceparent = coalesce(ended.traceparent, steps.traceparent),
            started_at = coalesce(steps.started_at, ended.started)
        FROM ended
        WHERE steps.job_id = ended.id AND steps.state = 'released'
        RETURNING steps.workflow_id, steps.name, ended.outcome, ended.has_parent
    )
    SELECT array_agg(workflow_id ORDER BY workflow_id, name),
           array_agg(name ORDER BY workflow_id, name),
           array_agg(outcome ORDER BY workflow_id, name),
           array_agg(DISTINCT workflow_id) FILTER (WHERE has_parent)
    INTO ended_workflows, ended_names, ended_outcomes, parents_to_wake
    FROM marked;
    IF ended_workflows IS NULL THEN
        RETURN;
    END IF;

    -- Steps that died or were cancelled: their dependents go on or are
    -- cancelled step by step, as before. (Each IF below is a plain
    -- expression: a settle with nothing of the kind runs no statement.)
    IF ended_outcomes <> array_fill('done'::text, ARRAY[cardinality(ended_outcomes)]) THEN
        FOR failed IN
            SELECT e.workflow_id, e.name, e.outcome
            FROM unnest(ended_workflows, ended_names, ended_outcomes) AS e(workflow_id, name, outcome)
            WHERE e.outcome <> 'done'
        LOOP
            PERFORM apalis.workflow_step_ended(failed.workflow_id, failed.name, failed.outcome);
        END LOOP;
    END IF;

    -- Steps that succeeded: each waiting dependent counts off as many of
    -- its dependencies as ended here; those at zero are due.
    WITH done AS (
        SELECT e.workflow_id, e.name
        FROM unnest(ended_workflows, ended_names, ended_outcomes) AS e(workflow_id, name, outcome)
        WHERE e.outcome = 'done'
    ), counts AS (
        SELECT edges.workflow_id, edges.dependent AS name, count(*)::integer AS ended
        FROM done
        JOIN apalis.workflow_edges AS edges
          ON edges.workflow_id = done.workflow_id AND edges.dependency = done.name
        GROUP BY edges.workflow_id, edges.dependent
    ), locked AS (
        SELECT steps.workflow_id, steps.name, counts.ended
        FROM apalis.workflow_steps AS steps
        JOIN counts ON counts.workflow_id = steps.workflow_id AND counts.name = steps.name
        WHERE steps.state = 'waiting'
        ORDER BY steps.workflow_id, steps.name
        FOR UPDATE OF steps
    ), counted AS (
        UPDATE apalis.workflow_steps AS steps
        SET waiting_for = steps.waiting_for - locked.ended
        FROM locked
        WHERE steps.workflow_id = locked.workflow_id AND steps.name = locked.name
          AND steps.state = 'waiting'
        RETURNING steps.workflow_id, steps.name, steps.waiting_for
    )
    SELECT array_agg(counted.workflow_id ORDER BY counted.workflow_id, counted.name),
           array_agg(counted.name ORDER BY counted.workflow_id, counted.name),
           array_agg(workflows.cancel_requested_at IS NOT NULL
                     ORDER BY counted.workflow_id, counted.name)
    INTO zero_workflows, zero_names, zero_cancelled
    FROM counted
    JOIN apalis.workflows ON workflows.id = counted.workflow_id
    WHERE counted.waiting_for = 0;

    IF zero_workflows IS NOT NULL THEN
        -- At zero in a cancelled workflow: cancelled, and so on down the graph.
        IF true = ANY (zero_cancelled) THEN
            FOR zero IN
                SELECT z.workflow_id, z.name
                FROM unnest(zero_workflows, zero_names, zero_cancelled) AS z(workflow_id, name, cancelled)
                WHERE z.cancelled
            LOOP
                UPDATE apalis.workflow_steps SET state = 'cancelled', finished_at = now()
                WHERE workflow_id = zero.workflow_id AND name = zero.name;
                PERFORM apalis.workflow_step_ended(zero.workflow_id, zero.name, 'cancelled');
            END LOOP;
        END IF;

        -- Released, as `release_workflow_step` releases one: due now or after
        -- its delay, carrying its dependencies' traceparents.
        WITH released AS (
            UPDATE apalis.workflow_steps AS step
            SET state = 'released', released_at = now()
            FROM unnest(zero_workflows, zero_names, zero_cancelled) AS z(workflow_id, name, cancelled)
            WHERE step.workflow_id = z.workflow_id AND step.name = z.name AND NOT z.cancelled
            RETURNING step.*
        )
        INSERT INTO apalis.jobs
            (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata,
             workflow_id, concurrency_key)
        SELECT step.job_id, step.job_type, step.payload, 'Pending', 0, step.max_attempts,
               now() + make_interval(secs => coalesce(step.delay_secs, 0)), step.priority,
               step.metadata
                   || hstore(ARRAY['workflow.id', step.workflow_id, 'workflow.step', step.name])
                   || CASE WHEN links.links IS NULL THEN ''::hstore
                           ELSE hstore('workflow.links', links.links) END,
               step.workflow_id, step.concurrency_key
        FROM released AS step
        CROSS JOIN LATERAL (
            SELECT string_agg(dependency.traceparent, ',' ORDER BY dependency.name) AS links
            FROM apalis.workflow_steps AS dependency
            WHERE dependency.workflow_id = step.workflow_id
              AND dependency.name = ANY (step.depends_on)
              AND dependency.traceparent IS NOT NULL
        ) AS links
        ORDER BY step.job_id;
    END IF;

    -- A workflow with a parent wakes it when its last open step ended.
    IF parents_to_wake IS NOT NULL THEN
        FOREACH parent_wf IN ARRAY parents_to_wake LOOP
            PERFORM apalis.wake_parent_of_ended_workflow(parent_wf);
        END LOOP;
    END IF;
END;
$$;

-- The row trigger skips the one UPDATE `record_events` runs itself (its
-- steps are ended by `end_workflow_steps` right after).
DROP TRIGGER IF EXISTS jobs_settle_workflow_step ON apalis.jobs;
CREATE TRIGGER jobs_settle_workflow_step
AFTER UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    NEW.workflow_id IS NOT NULL
    AND OLD.status IS DISTINCT FROM NEW.status
    AND (NEW.status IN ('Done', 'Killed') OR (NEW.status = 'Failed' AND NEW.attempts >= NEW.max_attempts))
    AND (pg_trigger_depth() > 0
         OR current_setting('apalis.steps_ended_by_caller', true) IS DISTINCT FROM 'on')
)
EXECUTE FUNCTION apalis.jobs_settle_workflow_step();

-- A worker's settle (`queries::RECORD_EVENTS`, which documents the
-- arguments): results and start marks of the jobs it still holds, then the
-- workflow steps among the jobs that ended. Returns the numbers of results
-- and starts recorded.
CREATE OR REPLACE FUNCTION apalis.record_events(
    result_ids text[], result_attempts int4[], result_statuses text[], outcomes jsonb[],
    started_ids text[], worker text, backoff_base float8, backoff_cap float8,
    retry_in float8[], doublings int4, suspended_for text[], traceparents text[],
    OUT finished bigint, OUT started bigint)
LANGUAGE plpgsql
-- Every statement here, and in `end_workflow_steps`, starts from the handful
-- of rows the settle names and looks up their neighbours by key. Their plans
-- are made once per session and kept (generic plans, on whatever statistics
-- the tables had then: with no autovacuum, those of empty tables), and such
-- plans scanned all of `workflow_steps` per settle (measured: 3-4 ms a
-- settle after 8,000 steps, the chains' throughput halved). Without
-- sequential scans, hash or merge joins to choose, each is a nested loop of
-- index lookups, whatever the statistics say.
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    ended_ids text[];
    ended_statuses text[];
    ended_workflows text[];
    ended_traces text[];
    ended_starts timestamptz[];
    retried_ids text[];
    retried_traces text[];
    retried_starts timestamptz[];
BEGIN
    PERFORM set_config('apalis.steps_ended_by_caller', 'on', true);
    WITH settled AS (
        UPDATE apalis.jobs AS jobs
        SET status = case when result.suspended_for is null then result.status else 'Pending' end,
            attempts = case when result.suspended_for is null then result.attempt else jobs.attempts end,
            last_result = case when result.suspended_for is null then result.outcome else jobs.last_result end,
            done_at = case when result.suspended_for is null then now() end,
            lock_by = case when result.suspended_for is null then jobs.lock_by end,
            lock_at = case when result.suspended_for is null then jobs.lock_at end,
            suspended_for = result.suspended_for,
            run_at = case
                when result.suspended_for is not null
                then clock_timestamp() + make_interval(secs => result.retry_in)
                when result.status = 'Failed'
                then clock_timestamp() + make_interval(secs => coalesce(result.retry_in,
                    least(backoff_base * case when result.attempt - 1 <= doublings
                                    then power(2, greatest(result.attempt - 1, 0))
                                    else power(2, doublings) * (result.attempt - doublings) end,
                          backoff_cap)
                    * (0.9 + 0.2 * random())))
                else jobs.run_at end
        FROM unnest(record_events.result_ids, record_events.result_attempts,
                    record_events.result_statuses, record_events.outcomes,
                    record_events.retry_in, record_events.suspended_for,
                    record_events.traceparents)
             AS result(id, attempt, status, outcome, retry_in, suspended_for, traceparent)
        WHERE jobs.id = result.id AND jobs.lock_by IS NOT DISTINCT FROM record_events.worker
          AND jobs.status IN ('Queued', 'Running')
        RETURNING jobs.id, jobs.workflow_id, jobs.status, jobs.attempts, jobs.max_attempts,
                  jobs.lock_at, result.traceparent
    ), steps AS (
        SELECT *, status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts)
                  AS ended
        FROM settled
        WHERE workflow_id IS NOT NULL
    )
    SELECT (SELECT count(*) FROM settled),
           array_agg(id) FILTER (WHERE ended), array_agg(status) FILTER (WHERE ended),
           array_agg(workflow_id) FILTER (WHERE ended),
           array_agg(traceparent) FILTER (WHERE ended), array_agg(lock_at) FILTER (WHERE ended),
           array_agg(id) FILTER (WHERE NOT ended AND traceparent IS NOT NULL),
           array_agg(traceparent) FILTER (WHERE NOT ended AND traceparent IS NOT NULL),
           array_agg(lock_at) FILTER (WHERE NOT ended AND traceparent IS NOT NULL)
    INTO finished, ended_ids, ended_statuses, ended_workflows, ended_traces, ended_starts,
         retried_ids, retried_traces, retried_starts
    FROM steps;
    PERFORM set_config('apalis.steps_ended_by_caller', 'off', true);

    started := 0;
    IF cardinality(record_events.started_ids) > 0 THEN
        UPDATE apalis.jobs
        SET status = 'Running', lock_at = now()
        WHERE id = ANY (record_events.started_ids)
          AND lock_by IS NOT DISTINCT FROM record_events.worker AND status = 'Queued';
        GET DIAGNOSTICS started = ROW_COUNT;
    END IF;

    -- A step's attempt that did not end it (it will be tried again, or it
    -- is suspended): its trace and start, as an ending attempt's below.
    IF retried_ids IS NOT NULL THEN
        UPDATE apalis.workflow_steps AS steps
        SET traceparent = attempt.traceparent,
            started_at = coalesce(steps.started_at, attempt.started)
        FROM unnest(retried_ids, retried_traces, retried_starts) AS attempt(id, traceparent, started)
        WHERE steps.job_id = attempt.id;
    END IF;

    IF ended_ids IS NOT NULL THEN
        PERFORM apalis.end_workflow_steps(ended_ids, ended_statuses, ended_workflows,
                                          ended_traces, ended_starts);
    END IF;
END;
$$;
