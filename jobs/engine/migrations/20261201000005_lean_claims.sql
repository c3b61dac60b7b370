-- Cheaper claims and settles (the queue-throughput work).
--
-- Every claim sets `lock_by` on each claimed row, and every settle writes the
-- row again, so each index and check on `lock_by` is paid per job, twice:
-- - apalis-postgres's foreign key to apalis.workers looked up (and share-
--   locked) the worker's row for every claimed job. The worker that claims
--   registered itself first, recovery joins on the workers it finds, and the
--   reaper returns attempts of any worker, listed or not; and workers are
--   pruned only when no open job names them.
-- - its index on `lock_by` held every job ever claimed; what reads it
--   (recovery, pruning workers) asks only for open jobs.
ALTER TABLE apalis.jobs DROP CONSTRAINT IF EXISTS fk_worker_lock_by;
DROP INDEX IF EXISTS apalis.idx_apalis_jobs_lock_by;
CREATE INDEX IF NOT EXISTS jobs_open_lock_by ON apalis.jobs (lock_by)
    WHERE status IN ('Queued', 'Running');
