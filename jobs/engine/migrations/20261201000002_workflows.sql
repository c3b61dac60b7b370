-- Workflows: DAGs of ordinary jobs ("steps"), released exactly once.
--
-- A step waits in apalis.workflow_steps until every dependency has ended;
-- then it is inserted into apalis.jobs under the id it was given at enqueue,
-- and from there it is a job like any other (claim, leases, retries, backoff,
-- timeout). The release happens in the transaction that records the last
-- dependency's end: a trigger on apalis.jobs, so any statement that settles
-- a job (a worker's result, a recovery, an operator's cancel) releases its
-- dependents, and none can forget to.
--
-- Exactly once: each dependent's count of open dependencies is decremented
-- under its row lock, so of any number of dependencies ending at once
-- exactly one sees it reach zero; the release also flips the step from
-- 'waiting' to 'released', and the job's id is its primary key.

ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS workflow_id text;
-- Partial: plain jobs (the most) skip it; the id never changes, so updates
-- stay HOT-capable.
CREATE INDEX IF NOT EXISTS jobs_workflow_id ON apalis.jobs (workflow_id)
    WHERE workflow_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS apalis.workflows (
    id text PRIMARY KEY,
    name text NOT NULL,
    -- The caller's idempotency key: enqueueing a workflow with a key that
    -- exists returns the existing one.
    key text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    cancel_requested_at timestamptz
);

CREATE TABLE IF NOT EXISTS apalis.workflow_steps (
    workflow_id text NOT NULL REFERENCES apalis.workflows (id) ON DELETE CASCADE,
    name text NOT NULL,
    job_id text NOT NULL UNIQUE,
    job_type text NOT NULL,
    payload bytea NOT NULL,
    max_attempts integer NOT NULL,
    -- Copied into the job's metadata at release (the enqueuer's trace).
    metadata hstore NOT NULL,
    depends_on text[] NOT NULL,
    -- Dependencies that have not ended yet.
    waiting_for integer NOT NULL CHECK (waiting_for >= 0),
    on_dependency_failure text NOT NULL CHECK (on_dependency_failure IN ('cancel', 'run')),
    -- waiting -> released (its job's state is the job's) -> done | dead | cancelled.
    state text NOT NULL CHECK (state IN ('waiting', 'released', 'done', 'dead', 'cancelled')),
    -- The W3C traceparent of the step's latest attempt (its CONSUMER span),
    -- so that dependents' spans can link to it.
    traceparent text,
    added_at timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (workflow_id, name)
);

-- Who waits for whom: found by (workflow, dependency) when a step ends.
CREATE TABLE IF NOT EXISTS apalis.workflow_edges (
    workflow_id text NOT NULL,
    dependency text NOT NULL,
    dependent text NOT NULL,
    PRIMARY KEY (workflow_id, dependency, dependent),
    FOREIGN KEY (workflow_id, dependent)
        REFERENCES apalis.workflow_steps (workflow_id, name) ON DELETE CASCADE
);

-- The view gains the new column (a view's `*` is expanded when it is made).
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

-- Inserts a step's job: due now, so apalis's insert trigger wakes the workers
-- at commit. Its metadata tells the runtime which workflow and step it is,
-- and carries its dependencies' traceparents (span links of a fan-in).
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
        (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, workflow_id)
    VALUES (
        step.job_id, step.job_type, step.payload, 'Pending', 0, step.max_attempts, now(), 0,
        step.metadata
            || hstore(ARRAY['workflow.id', step.workflow_id, 'workflow.step', step.name])
            || CASE WHEN links IS NULL THEN ''::hstore ELSE hstore('workflow.links', links) END,
        step.workflow_id
    );
    UPDATE apalis.workflow_steps SET state = 'released', released_at = now()
    WHERE workflow_id = step.workflow_id AND name = step.name;
END;
$$;

-- A step ended ('done', 'dead' or 'cancelled'): each waiting dependent
-- counts it off and is released at zero, or, when the step failed and the
-- dependent runs only after success, is cancelled (and so on down the graph).
-- Dependents are locked in name order, so concurrent ends cannot deadlock
-- over one workflow's steps.
CREATE OR REPLACE FUNCTION apalis.workflow_step_ended(wf text, step_name text, outcome text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    dependent apalis.workflow_steps;
    cancelled boolean;
BEGIN
    FOR dependent IN
        SELECT steps.*
        FROM apalis.workflow_edges AS edges
        JOIN apalis.workflow_steps AS steps
          ON steps.workflow_id = edges.workflow_id AND steps.name = edges.dependent
        WHERE edges.workflow_id = wf AND edges.dependency = step_name AND steps.state = 'waiting'
        ORDER BY steps.name
        FOR UPDATE OF steps
    LOOP
        IF outcome = 'done' OR dependent.on_dependency_failure = 'run' THEN
            UPDATE apalis.workflow_steps SET waiting_for = waiting_for - 1
            WHERE workflow_id = wf AND name = dependent.name
            RETURNING * INTO dependent;
            IF dependent.waiting_for = 0 THEN
                SELECT cancel_requested_at IS NOT NULL INTO cancelled
                FROM apalis.workflows WHERE id = wf;
                IF cancelled THEN
                    UPDATE apalis.workflow_steps SET state = 'cancelled', finished_at = now()
                    WHERE workflow_id = wf AND name = dependent.name;
                    PERFORM apalis.workflow_step_ended(wf, dependent.name, 'cancelled');
                ELSE
                    PERFORM apalis.release_workflow_step(dependent);
                END IF;
            END IF;
        ELSE
            UPDATE apalis.workflow_steps SET state = 'cancelled', finished_at = now()
            WHERE workflow_id = wf AND name = dependent.name;
            PERFORM apalis.workflow_step_ended(wf, dependent.name, 'cancelled');
        END IF;
    END LOOP;
END;
$$;

-- A step's job ended: done, or dead (cancelled, if its workflow was).
CREATE OR REPLACE FUNCTION apalis.jobs_settle_workflow_step() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    outcome text;
    step_name text;
BEGIN
    IF NEW.status = 'Done' THEN
        outcome := 'done';
    ELSIF EXISTS (SELECT 1 FROM apalis.workflows
                  WHERE id = NEW.workflow_id AND cancel_requested_at IS NOT NULL) THEN
        outcome := 'cancelled';
    ELSE
        outcome := 'dead';
    END IF;
    UPDATE apalis.workflow_steps SET state = outcome, finished_at = now()
    WHERE job_id = NEW.id AND state = 'released'
    RETURNING name INTO step_name;
    IF step_name IS NOT NULL THEN
        PERFORM apalis.workflow_step_ended(NEW.workflow_id, step_name, outcome);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS jobs_settle_workflow_step ON apalis.jobs;
CREATE TRIGGER jobs_settle_workflow_step
AFTER UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    NEW.workflow_id IS NOT NULL
    AND OLD.status IS DISTINCT FROM NEW.status
    AND (NEW.status IN ('Done', 'Killed') OR (NEW.status = 'Failed' AND NEW.attempts >= NEW.max_attempts))
)
EXECUTE FUNCTION apalis.jobs_settle_workflow_step();

-- An operator's retry of a dead step runs it again: it is released again
-- (its dependents, cancelled when it died, stay cancelled).
CREATE OR REPLACE FUNCTION apalis.jobs_reopen_workflow_step() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE apalis.workflow_steps SET state = 'released', finished_at = NULL
    WHERE job_id = NEW.id AND state IN ('dead', 'cancelled');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS jobs_reopen_workflow_step ON apalis.jobs;
CREATE TRIGGER jobs_reopen_workflow_step
AFTER UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (NEW.workflow_id IS NOT NULL AND OLD.status = 'Killed' AND NEW.status = 'Pending')
EXECUTE FUNCTION apalis.jobs_reopen_workflow_step();

-- A step of a cancelled workflow is never tried again: a failed or handed-back
-- attempt ends it, cancelled.
CREATE OR REPLACE FUNCTION apalis.jobs_no_retry_in_cancelled_workflow() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM apalis.workflows
               WHERE id = NEW.workflow_id AND cancel_requested_at IS NOT NULL) THEN
        NEW.status := 'Killed';
        NEW.done_at := now();
        NEW.lock_by := NULL;
        NEW.unique_key := NULL;
        NEW.last_result := jsonb_build_object('Err', 'cancelled with its workflow'
            || coalesce(' (the attempt: ' || (NEW.last_result ->> 'Err') || ')', ''));
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS jobs_no_retry_in_cancelled_workflow ON apalis.jobs;
CREATE TRIGGER jobs_no_retry_in_cancelled_workflow
BEFORE UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    NEW.workflow_id IS NOT NULL
    AND OLD.status IN ('Queued', 'Running')
    AND NEW.status IN ('Failed', 'Pending')
)
EXECUTE FUNCTION apalis.jobs_no_retry_in_cancelled_workflow();

-- Adds steps to workflow `wf` (at its enqueue, or from a running step):
-- `steps` is a JSON array of {name, job_type, max_attempts, depends_on,
-- on_dependency_failure}, `payloads` their payloads in order, `meta` the
-- adder's trace context. A step whose name exists is skipped (a re-run of the
-- adding step adds nothing twice). Dependencies must exist (earlier in
-- `steps` or in the workflow). A step is released at once when none of its
-- dependencies is open, cancelled at once when one failed and it needs them
-- all to succeed, or when the workflow is cancelled.
--
-- Dependencies are read FOR SHARE: a dependency ending concurrently either
-- commits first (and is seen as ended here) or waits for this transaction
-- (and then finds the new edge and counts it off).
-- Returns the number of steps added.
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
             waiting_for, on_dependency_failure, state, finished_at)
        VALUES (
            wf, step ->> 'name', job_ids[position], step ->> 'job_type', payloads[position],
            (step ->> 'max_attempts')::integer, meta, dependencies, open,
            step ->> 'on_dependency_failure',
            CASE WHEN cancelled OR (failed > 0 AND step ->> 'on_dependency_failure' = 'cancel')
                 THEN 'cancelled' ELSE 'waiting' END,
            CASE WHEN cancelled OR (failed > 0 AND step ->> 'on_dependency_failure' = 'cancel')
                 THEN now() END
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
