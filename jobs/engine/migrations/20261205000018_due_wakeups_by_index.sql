-- The due-job waker finds its jobs by an index of its own.
--
-- Every poll interval, every worker process asks, per queue, whether a job
-- fell due in the last two intervals that no insert notified: a retry
-- waiting out its backoff, or a unique job whose window closed
-- (`queries::WAKE_FOR_DUE`). No index held those rows apart, and with a
-- million jobs waiting the planner scanned the table: 121 ms per queue per
-- poll, 0.6 s of every second for a worker of five queues, whole-table
-- reads that a fleet of such processes multiplied until Postgres did
-- nothing else.
--
-- This index holds only those rows (its predicate is the waker's, word for
-- word, so the planner can use it): a plain job, pending or claimed or
-- done, never has an entry, so a job's enqueue, claim and settle write
-- nothing more. The waker is then a probe per queue (0.01 ms at a million
-- waiting).
CREATE INDEX IF NOT EXISTS jobs_due_unnotified ON apalis.jobs (job_type, run_at)
WHERE
    (status = 'Pending' AND unique_key IS NOT NULL)
    OR (status = 'Failed' AND attempts < max_attempts);
