-- The in-database limit of a drain (issue 25): one pgbench transaction is a
-- worker's round without the worker: the claim of up to 100 due jobs of
-- queue `probe` (the engine's own `apalis.get_jobs`, as the worker calls it),
-- then their settle as done, writing what the worker's settle writes
-- (`queries::RECORD_EVENTS` for a successful attempt: status, attempts,
-- result, end time). Two statements, two round trips, as in the worker.
--
-- Its sessions commit with synchronous_commit=off, as the worker's
-- bookkeeping connections do. Run by `just bench` (section 3, "claim + settle by pgbench, no worker")
-- against its database, after it registered the worker `pgbench-claimer`
-- and bulk-enqueued the jobs; jobs/s = jobs done / pgbench's time.
select string_agg(id, ',') as ids
from apalis.get_jobs('pgbench-claimer', 'probe', 100) \gset
update apalis.jobs
set status = 'Done', attempts = attempts + 1, last_result = '{"Ok": null}'::jsonb,
    done_at = now()
where id = any (string_to_array(:ids, ','))
  and lock_by is not distinct from 'pgbench-claimer'
  and status in ('Queued', 'Running');
