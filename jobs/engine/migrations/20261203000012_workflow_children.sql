-- A workflow as a job's child (JobContext::spawn of a Workflow::returning):
-- the workflow remembers its parent and the step whose result the parent
-- awaits. When its last open step ends, the parent (if it waits for it,
-- `child:<workflow id>`) is due at once; when the parent dies, the workflow
-- is cancelled, as an operator's cancel would.

ALTER TABLE apalis.workflows ADD COLUMN IF NOT EXISTS parent_id text;
ALTER TABLE apalis.workflows ADD COLUMN IF NOT EXISTS output_step text;
CREATE INDEX IF NOT EXISTS workflows_parent_id ON apalis.workflows (parent_id)
    WHERE parent_id IS NOT NULL;

-- Workflow `wf` has a parent and no open step left: wakes the parent. The
-- workflow's row is locked first, so that of two last steps ending at once
-- the second waits for the first's commit and then sees no open step.
CREATE OR REPLACE FUNCTION apalis.wake_parent_of_ended_workflow(wf text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    parent text;
BEGIN
    SELECT parent_id INTO parent FROM apalis.workflows WHERE id = wf;
    IF parent IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM apalis.workflows WHERE id = wf FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM apalis.workflow_steps
                   WHERE workflow_id = wf AND state IN ('waiting', 'released')) THEN
        PERFORM apalis.wake_suspended(parent, 'child:' || wf);
    END IF;
END;
$$;

-- As before (see 20261201000002_workflows.sql), then wakes the workflow's
-- parent when this was its last open step.
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
        PERFORM apalis.wake_parent_of_ended_workflow(NEW.workflow_id);
    END IF;
    RETURN NULL;
END;
$$;

-- Cancels the workflows job `parent` spawned: their waiting steps are
-- cancelled, their steps' jobs that have not started die, and running ones
-- are not tried again (`jobs_no_retry_in_cancelled_workflow`).
CREATE OR REPLACE FUNCTION apalis.cancel_child_workflows(parent text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    children text[];
BEGIN
    WITH requested AS (
        UPDATE apalis.workflows SET cancel_requested_at = coalesce(cancel_requested_at, now())
        WHERE parent_id = parent
        RETURNING id
    )
    SELECT array_agg(id) INTO children FROM requested;
    IF children IS NULL THEN
        RETURN;
    END IF;
    UPDATE apalis.workflow_steps SET state = 'cancelled', finished_at = now()
    WHERE workflow_id = ANY (children) AND state = 'waiting';
    UPDATE apalis.jobs
    SET status = 'Killed', done_at = now(), unique_key = null, lock_by = null, lock_at = null,
        last_result = jsonb_build_object('Err', format('cancelled: its parent %s died', parent))
    WHERE workflow_id = ANY (children)
      AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts));
END;
$$;

-- As before (see 20261203000009_durable_execution.sql), and a job that died
-- cancels the workflows it spawned.
CREATE OR REPLACE FUNCTION apalis.jobs_end_family() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.parent_id IS NOT NULL THEN
        PERFORM apalis.wake_suspended(NEW.parent_id, 'child:' || NEW.id);
    END IF;
    IF NEW.status = 'Killed' OR NEW.status = 'Failed' THEN
        UPDATE apalis.jobs
        SET status = 'Killed', done_at = now(), unique_key = null, suspended_for = null,
            last_result = jsonb_build_object('Err', format('cancelled: its parent %s died', NEW.id))
        WHERE parent_id = NEW.id
          AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts));
        PERFORM apalis.cancel_child_workflows(NEW.id);
    END IF;
    RETURN NULL;
END;
$$;
