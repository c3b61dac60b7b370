-- A job's `lock_by` is indexed only while it is claimed or running.
--
-- apalis-postgres's index on `lock_by` held an entry for every job, and each
-- update of a job wrote another one: the insert (a NULL), the claim, the
-- start mark and the settle, though `lock_by` only changes at the claim and
-- is only ever looked up for open jobs (a lost worker's jobs, a worker's
-- hand-back, whether a silent worker still holds a job). Over open jobs only,
-- the insert and the settle (the two writes of every job) write no entry:
-- the claim and settle of 100 jobs, back to back in Postgres
-- (`tests/pgbench/claim_settle.sql`, two clients), went from 40,000-45,000 to
-- 52,000-55,000 jobs/s on our 2-core machine.
--
-- `lock_by IS NOT NULL` is in the predicate so that only lookups by a worker
-- (`lock_by = $1`, which implies it) can use the index: the settle's and the
-- start mark's `lock_by IS NOT DISTINCT FROM $1` does not, and they keep
-- finding their rows by id instead of scanning every open job.
CREATE INDEX IF NOT EXISTS jobs_lock_by_open ON apalis.jobs (lock_by)
    WHERE lock_by IS NOT NULL AND status IN ('Queued', 'Running');
DROP INDEX IF EXISTS apalis.idx_apalis_jobs_lock_by;
