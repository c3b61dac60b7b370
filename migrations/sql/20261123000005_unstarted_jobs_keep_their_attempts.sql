-- A job handed back unstarted at a graceful shutdown keeps its attempts.
--
-- A worker claims jobs in batches (status 'Queued') and runs them as slots
-- free up. At a graceful shutdown apalis-postgres returns the claimed jobs it
-- never handed to a handler to 'Pending', and counts an attempt for each.
-- They never started, so a few deploys in a row could use up a job's
-- attempts and have it declared dead without ever having run.
--
-- Only that hand-back is undone, recognised by the result apalis writes with
-- it. After a lease expiry apalis re-queues with another message, and that
-- attempt still counts: the job may have started (its 'Running' mark can lag
-- behind the start), and a job that crashes its worker must use up its
-- attempts rather than loop.
CREATE FUNCTION apalis.keep_attempts_of_unstarted_jobs() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.attempts := OLD.attempts;
    RETURN NEW;
END;
$$;

CREATE TRIGGER keep_attempts_of_unstarted_jobs
BEFORE UPDATE OF status ON apalis.jobs
FOR EACH ROW
WHEN (
    OLD.status = 'Queued'
    AND NEW.status = 'Pending'
    AND NEW.attempts > OLD.attempts
    AND NEW.last_result ->> 'Err' = 'Re-enqueued due to worker shutdown'
)
EXECUTE FUNCTION apalis.keep_attempts_of_unstarted_jobs();
