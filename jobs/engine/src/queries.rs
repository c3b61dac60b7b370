//! Every statement the engine sends to the queue tables, each named once.
//!
//! What a job's state is (pending, scheduled, claimed, running, done, dead)
//! and when it is due is defined once, in the view `apalis.job_states` (see
//! the engine's migrations); statements here that ask about states read the
//! view. The claim itself (`apalis.get_jobs`) spells the waiting condition
//! out, because it must match the claim index's predicate word for word.

// ---- migrations (migrate.rs) ----

/// Gives the record of engine migration `$1` the checksum `$2` where it
/// still has `$3` (hex), the checksum of its first text (see
/// `migrate::REWORDED`). Run only where [`MIGRATION_HISTORY_EXISTS`].
pub(crate) const ACCEPT_REWORDED_MIGRATION: &str = "
update apalis._durable_jobs_migrations set checksum = $2
where version = $1 and checksum = decode($3, 'hex')";

/// Whether the engine has recorded any migration in this database.
pub(crate) const MIGRATION_HISTORY_EXISTS: &str =
    "select to_regclass('apalis._durable_jobs_migrations') is not null";

// ---- the worker's bookkeeping (storage.rs) ----

/// The claim: a batch of `$3` due jobs of queue `$2`, marked `Queued` for
/// `$1`; looking first past the claim order's key `$4` (priority), `$5`
/// (`run_at`), `$6` (id) when they are given (`storage::ClaimKey`).
pub(crate) const CLAIM: &str = "
select id, job, job_type, status, attempts, max_attempts, run_at, lock_at, lock_by,
       done_at, priority, idempotency_key, metadata
from apalis.get_jobs($1, $2, $3, $4, $5, $6)";

/// The claim of [`CLAIM`], row by row, ending each row that cannot be
/// updated alone (see the engine's migration `…0006_claim_isolates_bad_rows`):
/// for when the batch claim failed on an integrity violation.
pub(crate) const CLAIM_ISOLATING_BAD_ROWS: &str = "
select id, job, job_type, status, attempts, max_attempts, run_at, lock_at, lock_by,
       done_at, priority, idempotency_key, metadata
from apalis.claim_isolating_bad_rows($1, $2, $3)";

/// Ends claimed rows that cannot be run: `$1` ids, `$2` reasons, `$3` the claimer.
pub(crate) const KILL_REJECTED: &str = "
update apalis.jobs as jobs
set status = 'Killed', done_at = now(), lock_by = null, lock_at = null,
    last_result = jsonb_build_object('Err', rejected.reason)
from unnest($1::text[], $2::text[]) as rejected(id, reason)
where jobs.id = rejected.id and jobs.lock_by = $3";

/// Records a round of task events in one statement (`apalis.record_events`,
/// in `20261204000016_workflow_steps_settled_together.sql`): results (by id,
/// if this worker still holds the job) and starts (`Queued` → `Running`,
/// likewise), then the workflow steps among the jobs that ended, all
/// together (their release, set by set).
///
/// `lock_by` is compared with `IS NOT DISTINCT FROM` on purpose: that operator
/// cannot use the `lock_by` index, so the planner finds the rows by primary
/// key (a handful) rather than through `lock_by`, which matches every job this
/// worker ever finished and which the statistics underestimate for a new
/// worker name.
///
/// A failed attempt is settled in the same write as its acknowledgement:
/// status, attempts, `last_result`, and the retry's `run_at`: the delay the
/// job asked for (`$9`, `JobError::retry_after`), else the backoff's,
/// `$7 · 2^(attempt-1)` seconds for the first `$10` doublings and linear
/// after them, at most `$8`, with ±10 % jitter (`Backoff::nominal`).
///
/// Binds: `$1` result ids, `$2` attempts, `$3` statuses, `$4` outcomes
/// (`{"Ok": ..}`/`{"Err": ..}`), `$5` started ids, `$6` the worker's name,
/// `$7`/`$8` the backoff's base and cap in seconds, `$9` each result's own
/// retry delay in seconds (NULL: the backoff's), `$10` the backoff's doublings,
/// `$11` what each suspended job waits for (NULL: not suspended; then `$9`
/// is how long until it is due, and the job is waiting again with its
/// attempts and last result as they were), `$12` each workflow step's
/// attempt's traceparent (NULL: not a step), recorded on its step.
/// Returns the numbers of results and starts recorded.
pub const RECORD_EVENTS: &str = "
select finished, started
from apalis.record_events($1::text[], $2::int4[], $3::text[], $4::jsonb[], $5::text[], $6,
                          $7, $8, $9::float8[], $10, $11::text[], $12::text[])";

/// Registers a worker; a worker name is unique per process start (see
/// `worker::worker_name`), so an existing row is an error.
pub(crate) const REGISTER_WORKER: &str = "
insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
values ($1, $2, 'PgStorage', $3, now())
on conflict (id) do nothing";

/// Returns the jobs of `queue`'s workers that stopped heartbeating a lease ago
/// (`$1` seconds) to the queue, counting the lost attempt; a job with no
/// attempts left ends dead instead of looping through crash after crash.
///
/// Unlike apalis-postgres's `reenqueue_orphaned`, which this replaces, a
/// failure here is never a worker's death: recovery is retried at the next
/// heartbeat (see `storage::recover_orphans`).
///
/// The silent workers are found first, then their jobs by `lock_by`: a join
/// planned the other way round walked the whole `lock_by` index at every
/// heartbeat of every queue, which, with a transaction held open elsewhere,
/// holds an entry for every job claimed since (400,000 entries read in a
/// drain of 4,000 jobs, `storage::with_a_transaction_held_open_…`).
pub(crate) const RECOVER_ORPHANS: &str = r#"
with lost as (
    select jobs.id
    from apalis.jobs
    where jobs.lock_by = any (array(
            select workers.id from apalis.workers
            where workers.worker_type = $2
              and now() - workers.last_seen >= make_interval(secs => $1)))
      and jobs.status in ('Queued', 'Running')
    for update of jobs skip locked
)
update apalis.jobs as jobs
set status = case when jobs.attempts + 1 >= jobs.max_attempts then 'Killed' else 'Pending' end,
    done_at = case when jobs.attempts + 1 >= jobs.max_attempts then now() end,
    lock_by = null, lock_at = null, attempts = jobs.attempts + 1,
    last_result = case when jobs.attempts + 1 >= jobs.max_attempts
        then jsonb_build_object('Err', format('gave up after %s of %s attempts: the last was lost with its worker (crash or lease expiry)', jobs.attempts + 1, jobs.max_attempts))
        else '{"Err": "Re-enqueued due to worker heartbeat timeout."}'::jsonb end
from lost
where jobs.id = lost.id"#;

// ---- enqueueing (enqueue.rs) ----

/// Inserts jobs: `$1` ids, `$2` queue, `$3` payloads, `$4` max attempts,
/// `$5`/`$6` the metadata's keys and values (the enqueuer's trace context,
/// shared by the batch), `$7` when they are due (NULL: the transaction's
/// `now()`, so apalis's insert trigger notifies the workers; it skips future
/// rows, which the due-job waker wakes for when due), `$8` their priority,
/// `$9` their concurrency keys (NULLs for none).
pub(crate) const INSERT_JOBS: &str = "
insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, concurrency_key)
select job.id, $2, job.job, 'Pending', 0, $4, greatest(coalesce($7::timestamptz, now()), now()), $8,
       hstore($5::text[], $6::text[]), job.concurrency_key
from unnest($1::text[], $3::bytea[], $9::text[]) as job(id, job, concurrency_key)";

/// Inserts a unique job, or merges into the pending one of its key. The key
/// is `$7`, suffixed with the window when `$8` (window seconds) is set; the
/// job is then due when its window closes, else at once. `$5`/`$6` are the
/// metadata's keys and values (with the newcomer's order under
/// `unique.order` for `greatest`), `$9` the merge rule (`keep`, `replace` or
/// `greatest`), `$10` the newcomer's order, `$11` the earliest it may run
/// (NULL: no earlier bound), `$12` its priority, `$13` its concurrency key.
/// Returns no row when the pending job was claimed meanwhile (try again: the
/// key is free then).
pub(crate) const UPSERT_UNIQUE: &str = "
with slot as (
    select case when $8::float8 is null then $7
                else $7 || '@' || floor(extract(epoch from clock_timestamp()) / $8)::bigint end as key,
           case when $8::float8 is null then now()
                else to_timestamp((floor(extract(epoch from clock_timestamp()) / $8) + 1) * $8) end as run_at
)
insert into apalis.jobs as jobs
    (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, unique_key, concurrency_key)
select $1, $2, $3, 'Pending', 0, $4, greatest(slot.run_at, coalesce($11::timestamptz, now())), $12,
       hstore($5::text[], $6::text[]), slot.key, $13
from slot
on conflict (job_type, unique_key) where unique_key is not null do update set
    job = case when $9 = 'replace'
                 or ($9 = 'greatest' and $10 > coalesce(jobs.metadata -> 'unique.order', ''))
               then excluded.job else jobs.job end,
    metadata = case when $9 = 'replace'
                      or ($9 = 'greatest' and $10 > coalesce(jobs.metadata -> 'unique.order', ''))
                    then excluded.metadata else jobs.metadata end
where jobs.status = 'Pending'
returning id";

// ---- the runtime's upkeep (worker.rs) ----

/// Whether jobs of the queues `$1` have been due for longer than `$2`
/// seconds (the watchdog's question).
pub(crate) const DUE_FOR: &str = "
select exists (select 1 from apalis.job_states
               where job_type = any($1) and due and run_at < now() - make_interval(secs => $2))";

/// Wakes the workers of each queue in `$1` with a job that fell due in the
/// last `$2` seconds and that no insert notified: a retry, or a unique job
/// whose window closed (jobs due at insert were notified by apalis-postgres's
/// insert trigger, whose channel and payload this uses). apalis's poll
/// interval does not wake a worker parked after an empty claim (measured:
/// retries waited for the next heartbeat, a third of the lease). One probe
/// per queue of the index `jobs_due_unnotified`, whose predicate this
/// repeats word for word (without it, a sequential scan of the table per
/// queue, every poll: 121 ms each at a million waiting).
pub(crate) const WAKE_FOR_DUE: &str = "
select pg_notify('apalis::job::insert', json_build_object('job_type', queue, 'id', due.id)::text)
from unnest($1::text[]) as queue
cross join lateral (
    select id from apalis.jobs
    where job_type = queue
      and ((status = 'Pending' and unique_key is not null)
           or (status = 'Failed' and attempts < max_attempts))
      and run_at < now() and run_at >= now() - make_interval(secs => $2)
    limit 1
) as due";

/// Analyzes `apalis.jobs` when it has outgrown its statistics (see the
/// engine's migration `…0014_statistics_kept_up_with_the_queue`); true if it did.
pub(crate) const ANALYZE_JOBS_IF_OUTGROWN: &str = "select apalis.analyze_jobs_if_outgrown()";

// ---- operator views and actions (admin.rs) ----

/// Jobs per queue and state, in lifecycle order.
pub(crate) const QUEUE_STATUS: &str = "
select job_type as queue, state, count(*) as count,
       min(run_at) filter (where state in ('scheduled', 'sleeping', 'waiting')) as next_due
from apalis.job_states
group by job_type, state
order by job_type, array_position(
    array['pending', 'scheduled', 'sleeping', 'waiting', 'claimed', 'running', 'done', 'dead'], state)";

/// Jobs per queue and unfinished state. It spells the states out instead
/// of reading `apalis.job_states`, so that waiting jobs are counted through
/// the claim index (the view's state cannot use an index); keep it in step
/// with the view.
pub(crate) const OPEN_JOB_COUNTS: &str = "
select job_type as queue,
       case when suspended_for like 'sleep:%' then 'sleeping'
            when suspended_for is not null then 'waiting'
            when status = 'Failed' or run_at > now() then 'scheduled' else 'pending' end as state,
       count(*) as count,
       min(run_at) filter (where status = 'Failed' or run_at > now()) as next_due
from apalis.jobs
where status = 'Pending' or (status = 'Failed' and attempts < max_attempts)
group by 1, 2
union all
select job_type, case when status = 'Queued' then 'claimed' else 'running' end, count(*),
       null::timestamptz
from apalis.jobs
where status in ('Queued', 'Running')
group by 1, 2
order by 1, 2";

/// Per queue: done, dead and retrying in the last hour.
pub(crate) const LAST_HOUR: &str = "
select job_type as queue,
       count(*) filter (where state = 'done') as done,
       count(*) filter (where state = 'dead') as dead,
       count(*) filter (where state = 'scheduled' and status = 'Failed') as retrying
from apalis.job_states
where done_at > now() - interval '1 hour'
group by job_type order by job_type";

/// The newest `$1` dead jobs.
pub(crate) const DEAD_JOBS: &str = "
select id, job_type as queue, attempts,
       coalesce(last_result ->> 'Err', last_result::text) as last_error,
       done_at as died_at
from apalis.job_states where state = 'dead'
order by done_at desc nulls last, id desc
limit $1";

/// A dead job `$1` back to pending with fresh attempts; its queue's workers
/// are woken as for a new job. Returns how many jobs it put back (0 or 1).
pub(crate) const RETRY: &str = "
with retried as (
    update apalis.jobs
    set status = 'Pending', attempts = 0, run_at = now(),
        lock_by = null, lock_at = null, done_at = null
    where id = $1 and id in (select id from apalis.job_states where id = $1 and state = 'dead')
    returning id, job_type
), woken as (
    select pg_notify('apalis::job::insert', json_build_object('job_type', job_type, 'id', id)::text)
    from retried
)
select count(*) from woken";

/// A job `$1` that has not started ends dead, cancelled.
pub(crate) const CANCEL: &str = r#"
update apalis.jobs
set status = 'Killed', done_at = now(), unique_key = null, suspended_for = null,
    last_result = '{"Err": "cancelled by an operator"}'::jsonb
where id = $1
  and id in (select id from apalis.job_states
             where id = $1 and state in ('pending', 'scheduled', 'sleeping', 'waiting'))"#;

/// Deletes done jobs older than `$1` seconds and dead ones older than `$2`,
/// except workflow steps: a workflow is pruned whole (`PRUNE_WORKFLOWS`).
pub(crate) const PRUNE_JOBS: &str = "
with deleted as (
    delete from apalis.jobs
    where id in (select id from apalis.job_states
                 where workflow_id is null
                   and ((state = 'done' and done_at < now() - make_interval(secs => $1))
                        or (state = 'dead' and done_at < now() - make_interval(secs => $2))))
    returning status)
select count(*) filter (where status = 'Done'), count(*) filter (where status <> 'Done')
from deleted";

/// Locks the rows of workers silent for a day (see `PRUNE_WORKERS`).
pub(crate) const LOCK_SILENT_WORKERS: &str = "
select id from apalis.workers where last_seen < now() - interval '1 day' for update";

/// Deletes workers silent for a day that hold no open job (a finished job
/// keeps its worker's name as text). Run after
/// `LOCK_SILENT_WORKERS`, in its transaction: a claim share-locks its
/// worker's row (`apalis.get_jobs`), so the lock waits for a claim in
/// flight, and this statement's snapshot then sees what it claimed.
pub(crate) const PRUNE_WORKERS: &str = "
delete from apalis.workers w
where w.last_seen < now() - interval '1 day'
  and not exists (select 1 from apalis.jobs j
                  where j.lock_by = w.id and j.status in ('Queued', 'Running'))";

/// Kills pending jobs of types the whole fleet has not handled for `$2`
/// seconds: due for that long, and no worker of any process registered or
/// heartbeated as their type in that time (`apalis.workers`, one row per
/// worker and job type), nor is the type among `$1` (this process's own, which
/// may not have registered yet). Another service's workers on the same
/// database therefore keep their backlog alive, however long it waits, while
/// they are seen. A paused or throttled queue still has live workers, so it
/// never looks unhandled. The reason names the types the fleet does handle.
/// Returns how many jobs it killed.
pub(crate) const KILL_UNHANDLED: &str = r#"
with handled as (
    select worker_type as job_type from apalis.workers
    where last_seen >= now() - make_interval(secs => $2)
    union
    select unnest($1::text[])
), fleet as (
    select string_agg(job_type, ', ' order by job_type) as types from handled
), killed as (
    update apalis.jobs
    set status = 'Killed', done_at = now(), unique_key = null,
        last_result = jsonb_build_object('Err', format(
            'no worker handles job type %s: no worker registered it in the last %s s (the workers seen handle: %s)',
            job_type, $2, (select types from fleet)))
    where status = 'Pending'
      and not exists (select 1 from handled where handled.job_type = jobs.job_type)
      and run_at < now() - make_interval(secs => $2)
    returning 1
)
select count(*) from killed"#;

/// Returns attempts whose result can no longer arrive (`$1` job timeout,
/// `$2` lease, in seconds): `Running` for longer than timeout + lease, or
/// claimed and not started for longer than twice the timeout + lease.
///
/// A scan of the table, every lease in every worker process (120-170 ms at
/// a million rows): it must also find open rows with no worker's name,
/// which the open jobs' index `jobs_lock_by_open` leaves out on purpose
/// (see its migration), so it cannot be a probe of that index.
pub(crate) const REAP_LOST_ATTEMPTS: &str = r#"
update apalis.jobs
set status = case when attempts + 1 >= max_attempts then 'Killed' else 'Failed' end,
    attempts = attempts + 1,
    run_at = now(), done_at = now(),
    last_result = '{"Err": "attempt lost: no result was recorded within the job timeout"}'::jsonb
where (status = 'Running' and lock_at < now() - make_interval(secs => $1 + $2))
   or (status = 'Queued' and lock_at < now() - make_interval(secs => 2 * $1 + $2))"#;

/// One page of jobs, newest first: `$1` queue, `$2` state (each `null` for
/// any), `$3` only ids below this one (`null` for the newest), `$4` how many.
pub(crate) const JOBS_PAGE: &str = "
select id, job_type as queue, state, attempts, max_attempts, run_at,
       last_result ->> 'Err' as last_error
from apalis.job_states
where ($1::text is null or job_type = $1)
  and ($2::text is null or state = $2)
  and ($3::text is null or id < $3)
order by id desc limit $4";

/// Everything stored about job `$1`, its payload and result cut to their
/// first `$2` bytes (characters of the result), with their full sizes: a
/// 50 MB payload made the job page read it whole and send 87 MB of HTML.
pub(crate) const JOB_DETAIL: &str = "
select id, job_type as queue, state, status, attempts, max_attempts, run_at, lock_at,
       lock_by, done_at, substring(job from 1 for $2) as payload,
       octet_length(job)::bigint as payload_bytes,
       hstore_to_json(metadata)::text as metadata,
       left(last_result::text, $2) as last_result,
       octet_length(last_result::text)::bigint as last_result_bytes, unique_key,
       suspended_for, parent_id
from apalis.job_states where id = $1";

/// Each failed attempt of job `$1`, oldest first.
pub(crate) const JOB_ERRORS: &str = "
select attempt, error, failed_at from apalis.job_errors where job_id = $1 order by attempt, failed_at";

/// Everything stored about the newest job of queue `$1`, cut as in
/// [`JOB_DETAIL`] to `$2` (the page's panel reads it on every view and poll).
pub(crate) const LATEST_JOB_OF_QUEUE: &str = "
select id, job_type as queue, state, status, attempts, max_attempts, run_at, lock_at,
       lock_by, done_at, substring(job from 1 for $2) as payload,
       octet_length(job)::bigint as payload_bytes,
       hstore_to_json(metadata)::text as metadata,
       left(last_result::text, $2) as last_result,
       octet_length(last_result::text)::bigint as last_result_bytes, unique_key,
       suspended_for, parent_id
from apalis.job_states where job_type = $1 order by id desc limit 1";

/// The unfinished jobs of queue `$1`: waiting, claimed or running, and
/// failed but to be retried.
pub(crate) const OPEN_COUNTS_OF_QUEUE: &str = "
select count(*) filter (where status = 'Pending') as waiting,
       count(*) filter (where status in ('Queued', 'Running')) as running,
       count(*) filter (where status = 'Failed') as retrying
from apalis.jobs
where job_type = $1
  and (status in ('Pending', 'Queued', 'Running') or (status = 'Failed' and attempts < max_attempts))";

/// Queue `$1`'s unfinished jobs: due and waiting, not yet due (a delay, a
/// retry's backoff, a unique window), and claimed or running.
pub(crate) const QUEUE_PAGE_COUNTS: &str = "
select count(*) filter (where run_at <= now() and status in ('Pending', 'Failed')) as waiting,
       count(*) filter (where run_at > now() and status in ('Pending', 'Failed')) as scheduled,
       count(*) filter (where status in ('Queued', 'Running')) as running
from apalis.jobs
where job_type = $1
  and (status in ('Pending', 'Queued', 'Running') or (status = 'Failed' and attempts < max_attempts))";

/// Queue `$1`'s last hour, minute by minute (60 rows, the current minute
/// last): jobs started (by their latest attempt's start), jobs finished
/// (done or dead), and the p50 and p95 of the wait from due to start, in
/// seconds, of the jobs started that minute. Read from the job rows, so
/// jobs pruned within the hour drop out of it.
pub(crate) const QUEUE_MINUTES: &str = "
with minutes as (
    select generate_series(date_trunc('minute', now()) - interval '59 minutes',
                           date_trunc('minute', now()), interval '1 minute') as minute
), started as (
    select date_trunc('minute', lock_at) as minute, count(*) as started,
           percentile_cont(0.5) within group (order by greatest(extract(epoch from lock_at - run_at), 0)) as wait_p50,
           percentile_cont(0.95) within group (order by greatest(extract(epoch from lock_at - run_at), 0)) as wait_p95
    from apalis.jobs
    where job_type = $1 and status in ('Running', 'Done', 'Killed') and lock_at is not null
      and lock_at >= date_trunc('minute', now()) - interval '59 minutes'
    group by 1
), finished as (
    select date_trunc('minute', done_at) as minute, count(*) as finished
    from apalis.jobs
    where job_type = $1 and status in ('Done', 'Killed')
      and done_at >= date_trunc('minute', now()) - interval '59 minutes'
    group by 1
)
select minutes.minute, coalesce(started.started, 0) as started,
       coalesce(finished.finished, 0) as finished,
       started.wait_p50, started.wait_p95
from minutes
left join started using (minute)
left join finished using (minute)
order by minutes.minute";

// ---- workflows (workflow.rs; the release itself is the engine's trigger
// `jobs_settle_workflow_step`, see the workflows migration) ----

/// Creates workflow `$1` named `$2` with idempotency key `$3` (may be null).
/// Returns its id, or no row when a workflow with that key exists.
pub(crate) const INSERT_WORKFLOW: &str = "
insert into apalis.workflows (id, name, key) values ($1, $2, $3)
on conflict (key) do nothing
returning id";

/// The id of the workflow with idempotency key `$1`.
pub(crate) const WORKFLOW_BY_KEY: &str = "select id from apalis.workflows where key = $1";

/// Adds steps to workflow `$1` (see `apalis.add_workflow_steps`): `$2` their
/// JSON descriptions, `$3` job ids, `$4` payloads, `$5`/`$6` the trace
/// context's keys and values. Returns how many were new.
pub(crate) const ADD_WORKFLOW_STEPS: &str = "
select apalis.add_workflow_steps($1, $2, $3, $4, hstore($5::text[], $6::text[]))";

/// Results of the dependencies of step `$2` (workflow `$1`) whose job type is
/// `$3`, by name: `(name, status, last_result)`. Unfinished ones have no result.
pub(crate) const DEPENDENCY_RESULTS: &str = "
select dependency.name, jobs.status, jobs.last_result
from apalis.workflow_steps as step
join apalis.workflow_steps as dependency
  on dependency.workflow_id = step.workflow_id and dependency.name = any(step.depends_on)
left join apalis.jobs on jobs.id = dependency.job_id
where step.workflow_id = $1 and step.name = $2 and dependency.job_type = $3
order by dependency.name";

/// Whether workflow `$1` was asked to cancel.
pub(crate) const CANCEL_REQUESTED: &str = "
select cancel_requested_at is not null from apalis.workflows where id = $1";

/// Cancels workflow `$1`: waiting steps are cancelled, released steps that
/// have not started end dead as cancelled (their trigger records it), and
/// running steps see the request (`JobContext::cancel_requested`) and are not
/// retried. Returns `(found, steps cancelled, steps still running)`.
pub(crate) const CANCEL_WORKFLOW: &str = r#"
with requested as (
    update apalis.workflows set cancel_requested_at = coalesce(cancel_requested_at, now())
    where id = $1
    returning id
), waiting as (
    update apalis.workflow_steps set state = 'cancelled', finished_at = now()
    where workflow_id in (select id from requested) and state = 'waiting'
    returning name
), queued as (
    update apalis.jobs
    set status = 'Killed', done_at = now(), unique_key = null, lock_by = null, lock_at = null,
        last_result = '{"Err": "cancelled with its workflow"}'::jsonb
    where workflow_id in (select id from requested)
      and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))
    returning id
)
select (select count(*) from requested) > 0,
       (select count(*) from waiting) + (select count(*) from queued),
       (select count(*) from apalis.jobs
        where workflow_id in (select id from requested) and status in ('Queued', 'Running'))"#;

/// Workflow `$1`.
pub(crate) const WORKFLOW: &str = "
select id, name, key, created_at, cancel_requested_at, parent_id from apalis.workflows where id = $1";

/// The steps of workflow `$1`, in the order they were added, with their
/// job's state once released.
pub(crate) const WORKFLOW_STEPS: &str = "
select step.name, step.job_id, step.job_type, step.depends_on, step.on_dependency_failure,
       case when step.state = 'released' then coalesce(jobs.state, 'released') else step.state end
           as state,
       coalesce(jobs.attempts, 0) as attempts, step.max_attempts,
       step.added_at, step.released_at,
       coalesce(step.started_at, case when jobs.state = 'running' then jobs.lock_at end)
           as started_at,
       coalesce(step.finished_at, case when jobs.state in ('done', 'dead') then jobs.done_at end)
           as finished_at,
       jobs.last_result -> 'Ok' as result, jobs.last_result ->> 'Err' as error,
       jobs.suspended_for
from apalis.workflow_steps as step
left join apalis.job_states as jobs on jobs.id = step.job_id
where step.workflow_id = $1
order by step.added_at, step.name";

/// The workflows job `$1` spawned, as [`LATEST_WORKFLOWS`] counts them.
pub(crate) const CHILD_WORKFLOWS: &str = "
select workflows.id, workflows.name, workflows.created_at, workflows.cancel_requested_at,
       count(steps.name) as steps,
       count(*) filter (where steps.state = 'done') as done,
       count(*) filter (where steps.state in ('dead', 'cancelled')) as failed,
       count(*) filter (where steps.state in ('waiting', 'released')) as open
from apalis.workflows
left join apalis.workflow_steps as steps on steps.workflow_id = workflows.id
where workflows.parent_id = $1
group by workflows.id
order by workflows.id";

/// The newest `$1` workflows with their steps counted per state.
pub(crate) const LATEST_WORKFLOWS: &str = "
select workflows.id, workflows.name, workflows.created_at, workflows.cancel_requested_at,
       count(steps.name) as steps,
       count(*) filter (where steps.state = 'done') as done,
       count(*) filter (where steps.state in ('dead', 'cancelled')) as failed,
       count(*) filter (where steps.state in ('waiting', 'released')) as open
from apalis.workflows
left join apalis.workflow_steps as steps on steps.workflow_id = workflows.id
group by workflows.id
order by workflows.id desc
limit $1";

/// Deletes workflows whose steps have all ended (with their jobs, steps and
/// edges: whole, never half), once the last step has been over for `$1`
/// seconds (all done) or `$2` (some step dead or cancelled). Returns how
/// many workflows went.
pub(crate) const PRUNE_WORKFLOWS: &str = "
with finished as (
    select workflows.id
    from apalis.workflows
    join apalis.workflow_steps as steps on steps.workflow_id = workflows.id
    group by workflows.id
    having count(*) filter (where steps.state in ('waiting', 'released')) = 0
       and max(steps.finished_at) < now() - make_interval(secs =>
           case when count(*) filter (where steps.state <> 'done') > 0 then $2 else $1 end)
), jobs as (
    delete from apalis.jobs where workflow_id in (select id from finished)
)
delete from apalis.workflows where id in (select id from finished)";

// ---- periodic jobs (cron.rs) ----

/// Creates schedule `$1` (expression `$2`, catch-up `$3`) with nothing
/// handled before now, or takes the existing row, records the declared
/// expression and policy, and locks the row until the transaction ends, so
/// that one scheduler at a time advances it. Returns `handled_until`, the
/// last tick that got a job, and the database's clock read after the lock.
pub(crate) const LOCK_SCHEDULE: &str = "
insert into apalis.schedules as schedules (name, expression, catch_up, handled_until)
values ($1, $2, $3, clock_timestamp())
on conflict (name) do update set expression = excluded.expression, catch_up = excluded.catch_up
returning schedules.handled_until, schedules.last_tick, clock_timestamp()";

/// Enqueues the job of one tick: `$1` id, `$2` queue, `$3` payload, `$4` max
/// attempts, `$5` idempotency key (`<queue>@<tick>`), `$6`/`$7` the
/// metadata's keys and values. A tick that already has its job inserts
/// nothing and returns no row.
pub(crate) const INSERT_TICK_JOB: &str = "
insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
values ($1, $2, $3, 'Pending', 0, $4, now(), 0, hstore($6::text[], $7::text[]), $5)
on conflict (job_type, idempotency_key) where idempotency_key is not null do nothing
returning id";

/// Advances schedule `$1` to `$2` (never backwards), with the newest tick
/// enqueued `$3` and its job `$4` (kept when null), and the next tick `$5`.
pub(crate) const ADVANCE_SCHEDULE: &str = "
update apalis.schedules
set handled_until = greatest(handled_until, $2),
    last_tick = coalesce($3, last_tick), last_job_id = coalesce($4, last_job_id),
    next_tick = $5, updated_at = now()
where name = $1";

/// Every schedule, with the state of its newest job (null once pruned).
pub(crate) const SCHEDULES: &str = "
select schedules.name as queue, schedules.expression, schedules.catch_up,
       schedules.last_tick, schedules.last_job_id, jobs.state as last_job_state,
       schedules.next_tick
from apalis.schedules
left join apalis.job_states as jobs on jobs.id = schedules.last_job_id
order by schedules.name";

// ---- flow control (limits.rs, admin) ----

/// Records queue `$1`'s declared limits (`$2` concurrency, `$3` rate per
/// second, `$4` burst, `$5` key concurrency; NULLs for none), creating its
/// control row only when one is set: a queue without a row claims without
/// taking its lock. A row left with nothing in it goes.
pub(crate) const DECLARE_LIMITS: &str = "
with declared as (
    insert into apalis.queue_controls as controls
        (queue, declared_concurrency, declared_rate, declared_burst, declared_key_concurrency)
    select $1, $2, $3, $4, $5
    where num_nonnulls($2, $3, $4, $5) > 0
       or exists (select 1 from apalis.queue_controls where queue = $1)
    on conflict (queue) do update set
        declared_concurrency = excluded.declared_concurrency,
        declared_rate = excluded.declared_rate,
        declared_burst = excluded.declared_burst,
        declared_key_concurrency = excluded.declared_key_concurrency,
        updated_at = now()
    where (controls.declared_concurrency, controls.declared_rate, controls.declared_burst,
           controls.declared_key_concurrency)
          is distinct from (excluded.declared_concurrency, excluded.declared_rate,
                            excluded.declared_burst, excluded.declared_key_concurrency)
    returning queue
)
delete from apalis.queue_controls
where queue = $1 and not paused and not overridden
  and num_nonnulls(declared_concurrency, declared_rate, declared_burst, declared_key_concurrency) = 0
  and num_nonnulls($2, $3, $4, $5) = 0";

/// Pauses (`$2` true) or resumes queue `$1`; a resumed row with nothing
/// else in it goes.
pub(crate) const SET_PAUSED: &str = "
with set as (
    insert into apalis.queue_controls as controls (queue, paused) values ($1, $2)
    on conflict (queue) do update set paused = $2, updated_at = now()
    returning queue, paused, overridden,
              num_nonnulls(declared_concurrency, declared_rate, declared_burst, declared_key_concurrency) as declared
)
delete from apalis.queue_controls
where queue in (select queue from set where not paused and not overridden and declared = 0)";

/// Wakes queue `$1`'s workers in every process (after a resume, or limits
/// that may let held-back jobs start): their next claim comes now, not at
/// their poll.
pub(crate) const WAKE_QUEUE: &str = "
select pg_notify('apalis::job::insert', json_build_object('job_type', $1::text)::text)";

/// Overrides queue `$1`'s limits with `$2`..`$5` (as in [`DECLARE_LIMITS`]).
pub(crate) const OVERRIDE_LIMITS: &str = "
insert into apalis.queue_controls as controls
    (queue, overridden, concurrency, rate, burst, key_concurrency, tokens, refilled_at)
values ($1, true, $2, $3, $4, $5, null, null)
on conflict (queue) do update set
    overridden = true, concurrency = $2, rate = $3, burst = $4, key_concurrency = $5,
    tokens = null, refilled_at = null, updated_at = now()";

/// Puts queue `$1` back on its declared limits.
pub(crate) const RESET_LIMITS: &str = "
with reset as (
    update apalis.queue_controls
    set overridden = false, concurrency = null, rate = null, burst = null,
        key_concurrency = null, tokens = null, refilled_at = null, updated_at = now()
    where queue = $1
    returning queue, paused,
              num_nonnulls(declared_concurrency, declared_rate, declared_burst, declared_key_concurrency) as declared
)
delete from apalis.queue_controls
where queue in (select queue from reset where not paused and declared = 0)";

/// Every queue's controls: queue, paused, overridden, then the limits in
/// force (concurrency, rate, burst, key concurrency) and the declared ones.
pub(crate) const QUEUE_CONTROLS: &str = "
select queue, paused, overridden,
       case when overridden then concurrency else declared_concurrency end,
       case when overridden then rate else declared_rate end,
       case when overridden then burst else declared_burst end,
       case when overridden then key_concurrency else declared_key_concurrency end,
       declared_concurrency, declared_rate, declared_burst, declared_key_concurrency
from apalis.queue_controls
order by queue";

/// Ends queue `$1`'s waiting jobs (due or not, retries included; not those
/// claimed or running) as dead with the reason `$2`. Returns how many.
pub(crate) const PURGE_WAITING: &str = "
with purged as (
    update apalis.jobs
    set status = 'Killed', done_at = now(), lock_by = null, lock_at = null, unique_key = null,
        last_result = jsonb_build_object('Err', $2::text)
    where job_type = $1
      and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))
    returning 1
)
select count(*) from purged";

// ---- durable execution (durable/) ----

/// Job `$1`'s checkpoints: name, kind, value type, value.
pub(crate) const JOB_CHECKPOINTS: &str = "
select name, kind, value_type, value from apalis.job_checkpoints where job_id = $1";

/// Job `$1`'s checkpoint `$2`: kind, value type, value.
pub(crate) const JOB_CHECKPOINT: &str = "
select kind, value_type, value from apalis.job_checkpoints where job_id = $1 and name = $2";

/// Records checkpoint `$2` of job `$1` (kind `$3`, value type `$4`, value
/// `$5`) unless it exists; returns the value when it recorded it. In the
/// transaction of a `step_tx` (or a spawn), committed as that transaction is.
pub(crate) const RECORD_CHECKPOINT: &str = "
insert into apalis.job_checkpoints (job_id, name, kind, value_type, value)
values ($1, $2, $3, $4, $5)
on conflict (job_id, name) do nothing
returning value";

/// [`RECORD_CHECKPOINT`] on its own, committed without waiting for the disk
/// flush: a step's result, a sleep's or wait's deadline. A database crash
/// can lose the newest of them, and then the job's settle after it too (the
/// log is replayed in order): the job runs again and redoes that step (at
/// least once, as promised) or starts that sleep again. One flush per
/// checkpoint held a debug worker to 80 sleeps a second here.
pub(crate) const RECORD_CHECKPOINT_NO_FLUSH: &str = "
with no_flush as (select set_config('synchronous_commit', 'off', true))
insert into apalis.job_checkpoints (job_id, name, kind, value_type, value)
select $1, $2, $3, $4, $5 from no_flush
on conflict (job_id, name) do nothing
returning value";

/// A wait's outcome (`$3`: its deadline and outcome) replaces checkpoint
/// `$2` of job `$1`.
pub(crate) const SETTLE_CHECKPOINT: &str = "
with no_flush as (select set_config('synchronous_commit', 'off', true))
update apalis.job_checkpoints set value = $3 from no_flush where job_id = $1 and name = $2";

/// The value of signal `$2` to job `$1`, if it arrived.
pub(crate) const SIGNAL_OF: &str = "
select value, traceparent from apalis.job_signals where job_id = $1 and name = $2";

/// Keeps job `$1`'s suspending run's `traceparent` (`$2`) in its metadata
/// under `durable.previous_run` (`durable::PREVIOUS_RUN_KEY`), for the next
/// run to link to.
pub(crate) const REMEMBER_RUN: &str = "
with no_flush as (select set_config('synchronous_commit', 'off', true))
update apalis.jobs set metadata = coalesce(metadata, ''::hstore) || hstore('durable.previous_run', $2)
from no_flush where id = $1";

/// Makes job `$1` a child of job `$2`.
pub(crate) const ADOPT: &str = "update apalis.jobs set parent_id = $2 where id = $1";

/// Workflow `$1` becomes job `$2`'s child, awaited for step `$3`'s result.
pub(crate) const ADOPT_WORKFLOW: &str =
    "update apalis.workflows set parent_id = $2, output_step = $3 where id = $1";

/// Workflow `$1` as a child: whether a step is still open, its output step's
/// state, that step's job's result, and the error of the first step that
/// died.
pub(crate) const WORKFLOW_CHILD_OUTCOME: &str = "
select exists (select 1 from apalis.workflow_steps as step
               where step.workflow_id = wf.id and step.state in ('waiting', 'released')),
       wf.output_step,
       output.state,
       output_job.last_result,
       (select died.last_result ->> 'Err'
        from apalis.workflow_steps as step
        join apalis.jobs as died on died.id = step.job_id
        where step.workflow_id = wf.id and step.state = 'dead'
        order by step.finished_at
        limit 1)
from apalis.workflows as wf
left join apalis.workflow_steps as output
       on output.workflow_id = wf.id and output.name = wf.output_step
left join apalis.jobs as output_job on output_job.id = output.job_id
where wf.id = $1";

/// Job `$1`'s state and result, if it exists.
pub(crate) const CHILD_OUTCOME: &str = "
select state, last_result from apalis.job_states where id = $1";

/// The key that signs signal URLs.
pub(crate) const SIGNAL_KEY: &str = "
select secret from apalis.engine_secrets where name = 'signal_urls'";

/// Sends signal `$2` with value `$3` to job `$1` (see the migration's
/// `apalis.send_signal`): `delivered`, `already` or `no_job`.
pub(crate) const SEND_SIGNAL: &str = "select apalis.send_signal($1, $2, $3, $4)";

/// After a settle that suspended jobs `$1` (waiting for `$2`): wakes those
/// whose signal or child arrived meanwhile (before that settle committed),
/// which no wake-up could find suspended yet.
pub(crate) const WAKE_SUSPENDED: &str = "
select apalis.wake_suspended(job.id, job.waiting_for)
from unnest($1::text[], $2::text[]) as job(id, waiting_for)
where (job.waiting_for like 'signal:%'
       and exists (select 1 from apalis.job_signals as signal
                   where signal.job_id = job.id and signal.name = substr(job.waiting_for, 8)))
   or (job.waiting_for like 'child:%'
       and (exists (select 1 from apalis.jobs as child
                    where child.id = substr(job.waiting_for, 7)
                      and (child.status in ('Done', 'Killed')
                           or (child.status = 'Failed' and child.attempts >= child.max_attempts)))
            or exists (select 1 from apalis.workflows as child
                       where child.id = substr(job.waiting_for, 7)
                         and not exists (select 1 from apalis.workflow_steps as step
                                         where step.workflow_id = child.id
                                           and step.state in ('waiting', 'released')))))";

/// Job `$1`'s checkpoints for the dashboard, oldest first.
pub(crate) const CHECKPOINT_VIEWS: &str = "
select name, kind, value_type, value, created_at from apalis.job_checkpoints
where job_id = $1 order by created_at, name";

/// The jobs job `$1` spawned, as [`JOBS_PAGE`] lists them.
pub(crate) const CHILDREN_OF: &str = "
select id, job_type as queue, state, attempts, max_attempts, run_at,
       last_result ->> 'Err' as last_error
from apalis.job_states where parent_id = $1 order by id";

/// The oldest job of queue `$1` suspended for `$2` (`signal:<name>`).
pub(crate) const OLDEST_WAITING_FOR: &str = "
select id, job_type as queue, state, attempts, max_attempts, run_at,
       null::text as last_error
from apalis.job_states
where job_type = $1 and status = 'Pending' and suspended_for = $2 order by id limit 1";

/// Job `$1`'s wait checkpoint `$2`, locked (an answer reads its choices).
pub(crate) const WAIT_CHECKPOINT: &str = "
select value from apalis.job_checkpoints where job_id = $1 and name = $2 and kind = 'wait'
for update";

/// Completes job `$1` (held by worker `$3`, attempt `$4`) with result `$2`,
/// in a `finish_tx` step's transaction: as the settle would record it.
pub(crate) const COMPLETE_IN_STEP: &str = "
update apalis.jobs
set status = 'Done', attempts = $4, last_result = $2, done_at = now(), suspended_for = null
where id = $1 and lock_by = $3 and status in ('Queued', 'Running')";
