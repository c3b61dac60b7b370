-- Drop apalis.jobs' duplicate indexes.
--
-- apalis-postgres's first migration created `lidx` (lock_by) and
-- `unique_job_id` (id). Later ones added `idx_apalis_jobs_lock_by` on the
-- same column and a primary key on id, and their "streamline indices"
-- migration dropped the other old indexes but not these two. Every claim,
-- start and finish writes a new row version (status is in the claim index's
-- predicate, so none is a HOT update), and each version costs an entry in
-- every index: our benchmark measured claims 16 % and result rounds 20 %
-- cheaper without the duplicates. Nothing refers to them by name: the
-- primary key and idx_apalis_jobs_lock_by serve the same lookups.
--
-- apalis.workers has duplicates too, but its foreign key depends on one of
-- them and the table is small and rarely written; it is left as apalis made it.
DROP INDEX IF EXISTS apalis.lidx;
DROP INDEX IF EXISTS apalis.unique_job_id;
