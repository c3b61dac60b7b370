-- A signal keeps its sender's trace context, so that the run it wakes links
-- to the span that sent it (a signal's sender and its waiter are usually
-- two traces: an operator's request, a job's enqueue).

ALTER TABLE apalis.job_signals ADD COLUMN IF NOT EXISTS traceparent text;

DROP FUNCTION IF EXISTS apalis.send_signal(text, text, jsonb);

-- As before (see 20261203000009_durable_execution.sql), with the sender's
-- `traceparent` stored beside the signal.
CREATE OR REPLACE FUNCTION apalis.send_signal(target text, signal text, payload jsonb, sender text)
RETURNS text
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
    INSERT INTO apalis.job_signals (job_id, name, value, traceparent)
    VALUES (target, signal, payload, sender)
    ON CONFLICT (job_id, name) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'already';
    END IF;
    PERFORM apalis.wake_suspended(target, 'signal:' || signal);
    RETURN 'delivered';
END;
$$;
