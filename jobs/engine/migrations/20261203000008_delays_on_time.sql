-- Delays on time, and flow control for workflow steps: a step's delay
-- (Step::delay), and the priority and concurrency key its job gets at release
-- (a step is a job of its type: its type's limits hold for it as for any other);
-- timed wake-ups for jobs inserted for later (at the end).

ALTER TABLE apalis.workflow_steps ADD COLUMN IF NOT EXISTS delay_secs double precision
    CHECK (delay_secs >= 0);
ALTER TABLE apalis.workflow_steps ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE apalis.workflow_steps ADD COLUMN IF NOT EXISTS concurrency_key text;

-- As in the workflows migration, with the three columns read from each
-- step's description.
CREATE OR REPLACE FUNCTION apalis.add_workflow_steps(wf text, steps jsonb, job_ids text[], payloads bytea[], meta hstore)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    step jsonb;
    position integer := 0;
    added integer := 0;
    dependencies text[];
    existing integer;
    open integer;
    failed integer;
    cancelled boolean;
    new_step apalis.workflow_steps;
BEGIN
    SELECT cancel_requested_at IS NOT NULL INTO cancelled FROM apalis.workflows WHERE id = wf;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no workflow %', wf USING ERRCODE = 'foreign_key_violation';
    END IF;
    FOR step IN SELECT value FROM jsonb_array_elements(steps) LOOP
        position := position + 1;
        dependencies := ARRAY(SELECT jsonb_array_elements_text(step -> 'depends_on'));
        SELECT count(*),
               count(*) FILTER (WHERE d.state IN ('waiting', 'released')),
               count(*) FILTER (WHERE d.state IN ('dead', 'cancelled'))
        INTO existing, open, failed
        FROM (SELECT state FROM apalis.workflow_steps
              WHERE workflow_id = wf AND name = ANY (dependencies)
              FOR SHARE) AS d;
        IF existing <> cardinality(ARRAY(SELECT DISTINCT unnest(dependencies))) THEN
            RAISE EXCEPTION 'workflow %: step % depends on a step that does not exist (%)',
                wf, step ->> 'name', array_to_string(dependencies, ', ')
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        INSERT INTO apalis.workflow_steps
            (workflow_id, name, job_id, job_type, payload, max_attempts, metadata, depends_on,
             waiting_for, on_dependency_failure, state, finished_at,
             delay_secs, priority, concurrency_key)
        VALUES (
            wf, step ->> 'name', job_ids[position], step ->> 'job_type', payloads[position],
            (step ->> 'max_attempts')::integer, meta, dependencies, open,
            step ->> 'on_dependency_failure',
            CASE WHEN cancelled OR (failed > 0 AND step ->> 'on_dependency_failure' = 'cancel')
                 THEN 'cancelled' ELSE 'waiting' END,
            CASE WHEN cancelled OR (failed > 0 AND step ->> 'on_dependency_failure' = 'cancel')
                 THEN now() END,
            (step ->> 'delay_secs')::double precision,
            coalesce((step ->> 'priority')::smallint, 0),
            step ->> 'concurrency_key'
        )
        ON CONFLICT (workflow_id, name) DO NOTHING
        RETURNING * INTO new_step;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        added := added + 1;
        INSERT INTO apalis.workflow_edges (workflow_id, dependency, dependent)
        SELECT wf, dependency, new_step.name FROM unnest(dependencies) AS dependency
        ON CONFLICT DO NOTHING;
        IF new_step.state = 'waiting' AND new_step.waiting_for = 0 THEN
            PERFORM apalis.release_workflow_step(new_step);
        END IF;
    END LOOP;
    RETURN added;
END;
$$;

-- Inserts a step's job: due now (apalis's insert trigger wakes the workers at
-- commit) or, with a delay, that long after its release (the due-job waker
-- wakes them then). Its metadata tells the runtime which workflow and step it
-- is, and carries its dependencies' traceparents (span links of a fan-in).
CREATE OR REPLACE FUNCTION apalis.release_workflow_step(step apalis.workflow_steps) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    links text;
BEGIN
    SELECT string_agg(dependency.traceparent, ',' ORDER BY dependency.name) INTO links
    FROM apalis.workflow_steps AS dependency
    WHERE dependency.workflow_id = step.workflow_id
      AND dependency.name = ANY (step.depends_on)
      AND dependency.traceparent IS NOT NULL;
    INSERT INTO apalis.jobs
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata,
         workflow_id, concurrency_key)
    VALUES (
        step.job_id, step.job_type, step.payload, 'Pending', 0, step.max_attempts,
        now() + make_interval(secs => coalesce(step.delay_secs, 0)), step.priority,
        step.metadata
            || hstore(ARRAY['workflow.id', step.workflow_id, 'workflow.step', step.name])
            || CASE WHEN links IS NULL THEN ''::hstore ELSE hstore('workflow.links', links) END,
        step.workflow_id, step.concurrency_key
    );
    UPDATE apalis.workflow_steps SET state = 'released', released_at = now()
    WHERE workflow_id = step.workflow_id AND name = step.name;
END;
$$;

-- Wake-ups for jobs inserted for later too: per statement and queue, how
-- long until its earliest such job is due (`due_in`, seconds), so that
-- every worker process wakes that queue on a timer of its own then, not at
-- its next poll. Due rows are announced as before.
CREATE OR REPLACE FUNCTION apalis.notify_new_jobs() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', queue)::text)
    FROM (SELECT DISTINCT job_type AS queue FROM inserted WHERE run_at <= now()) AS due;
    PERFORM pg_notify('apalis::job::insert',
                      json_build_object('job_type', queue,
                                        'due_in', extract(epoch FROM due_at - clock_timestamp()))::text)
    FROM (SELECT job_type AS queue, min(run_at) AS due_at FROM inserted
          WHERE run_at > now() GROUP BY job_type) AS later;
    RETURN NULL;
END;
$$;
