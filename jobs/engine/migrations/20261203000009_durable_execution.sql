-- Durable execution: a job's checkpoints (its steps' results, its sleeps'
-- and waits' deadlines, the children it spawned), the signals sent to it,
-- its suspension (sleeping, or waiting for a signal or a child), and the
-- link from a child to its parent.
--
-- A suspended job is an ordinary waiting row (`Pending`, due at the end of
-- its sleep or wait), with `suspended_for` saying what it waits for: it holds
-- no lease, no slot and no connection, and the claim takes it when due like
-- any other. A signal or a child's end makes it due at once.

CREATE TABLE IF NOT EXISTS apalis.job_checkpoints (
    job_id text NOT NULL REFERENCES apalis.jobs (id) ON DELETE CASCADE,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('step', 'sleep', 'wait', 'spawn', 'await')),
    -- The Rust type of the value (without module paths): a name reused with
    -- another type is refused, not decoded by chance.
    value_type text NOT NULL,
    value jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);

-- One signal per job and name: the first wins, later ones are refused.
CREATE TABLE IF NOT EXISTS apalis.job_signals (
    job_id text NOT NULL REFERENCES apalis.jobs (id) ON DELETE CASCADE,
    name text NOT NULL,
    value jsonb NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);

-- 'sleep:<name>', 'signal:<name>' or 'child:<job id>' while suspended; NULL
-- otherwise (set and cleared by the settle).
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS suspended_for text;
-- The job that spawned this one (JobContext::spawn).
ALTER TABLE apalis.jobs ADD COLUMN IF NOT EXISTS parent_id text;
CREATE INDEX IF NOT EXISTS jobs_parent_id ON apalis.jobs (parent_id) WHERE parent_id IS NOT NULL;

-- The key that signs signal URLs (JobContext::signal_url), made once per
-- database: workers and the signals router read it, nobody configures it.
CREATE TABLE IF NOT EXISTS apalis.engine_secrets (
    name text PRIMARY KEY,
    secret bytea NOT NULL
);
INSERT INTO apalis.engine_secrets (name, secret)
VALUES ('signal_urls', gen_random_bytes(32))
ON CONFLICT (name) DO NOTHING;

-- The view gains the columns, and the states `sleeping` and `waiting`.
DROP VIEW IF EXISTS apalis.job_states;
CREATE VIEW apalis.job_states AS
SELECT
    jobs.*,
    CASE
        WHEN status = 'Pending' AND suspended_for LIKE 'sleep:%' THEN 'sleeping'
        WHEN status = 'Pending' AND suspended_for IS NOT NULL THEN 'waiting'
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

-- Wakes suspended job `target` (waiting for `waiting_for`) now (a signal arrived, a child ended), announcing
-- its queue. Locks the row first, waiting for a settle that is suspending it:
-- after that settle's commit the row matches; before it, the settle's own
-- check afterwards (`queries::WAKE_SUSPENDED`) sees this transaction's signal.
CREATE OR REPLACE FUNCTION apalis.wake_suspended(target text, waiting_for text) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    queue text;
BEGIN
    PERFORM 1 FROM apalis.jobs WHERE id = target FOR UPDATE;
    UPDATE apalis.jobs SET run_at = now()
    WHERE id = target AND status = 'Pending' AND suspended_for = waiting_for
    RETURNING job_type INTO queue;
    IF queue IS NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', queue)::text);
    RETURN true;
END;
$$;

-- A child ended (done or dead): its parent, if it waits for it, is due now.
-- A job that died (cancelled, out of attempts, past its age): its children
-- that have not started die too, and so on down.
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
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS jobs_end_family ON apalis.jobs;
CREATE TRIGGER jobs_end_family
AFTER UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    (NEW.parent_id IS NOT NULL OR NEW.status IN ('Killed', 'Failed'))
    AND OLD.status IS DISTINCT FROM NEW.status
    AND (NEW.status IN ('Done', 'Killed') OR (NEW.status = 'Failed' AND NEW.attempts >= NEW.max_attempts))
)
EXECUTE FUNCTION apalis.jobs_end_family();

-- Sends signal `signal` with `payload` to job `target`: 'delivered' (stored, and
-- the job woken if it waits for it), 'already' (the job has one of that
-- name: the first wins), 'wait_ended' (its wait for it timed out),
-- 'finished' (the job is done or dead) or 'no_job'. The job's row is locked
-- first, so a settle suspending it either commits before (and the wake
-- finds it waiting) or looks for signals after (and finds this one).
CREATE OR REPLACE FUNCTION apalis.send_signal(target text, signal text, payload jsonb) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    job_status text;
BEGIN
    SELECT status INTO job_status FROM apalis.jobs WHERE id = target FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'no_job';
    END IF;
    IF EXISTS (SELECT 1 FROM apalis.job_signals WHERE job_id = target AND name = signal) THEN
        RETURN 'already';
    END IF;
    IF job_status IN ('Done', 'Killed') THEN
        RETURN 'finished';
    END IF;
    IF EXISTS (SELECT 1 FROM apalis.job_checkpoints
               WHERE job_id = target AND name = signal AND kind = 'wait' AND value ? 'outcome') THEN
        RETURN 'wait_ended';
    END IF;
    INSERT INTO apalis.job_signals (job_id, name, value) VALUES (target, signal, payload)
    ON CONFLICT (job_id, name) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'already';
    END IF;
    PERFORM apalis.wake_suspended(target, 'signal:' || signal);
    RETURN 'delivered';
END;
$$;
