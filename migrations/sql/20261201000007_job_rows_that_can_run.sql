-- Job rows that a worker can always run, and coalescing that cannot conflict.
--
-- 1. A red team wrote rows that apalis-postgres's row decoder rejects (an id
--    that is not a ULID, a NULL value in the metadata hstore, a run_at before
--    1970): one such row failed every job claimed with it and crash-looped the
--    workers. The worker now kills such a row alone (jobs::storage::claim);
--    these checks keep them from being written at all. Ids must be canonical
--    (upper-case) ULIDs: the worker records results by the canonical text of
--    the id, so a lower-case twin of an existing id received the other row's
--    results. Rows that break a check are moved to apalis.rejected_jobs with
--    the reason first, so that no database fails this migration.
-- 2. The unique index "one pending trim_visits" made a recovered or retried
--    trim conflict with a newer pending one (unique violation in the worker's
--    heartbeat: the survivors of a SIGKILL crash-looped; the dashboard's Retry
--    answered 500). Coalescing now goes through apalis's own unique
--    (job_type, idempotency_key) index with one key per coalescing window
--    (jobs::trim_visits::enqueue), which no status change can violate.
create table apalis.rejected_jobs (
    id text not null,
    job_type text,
    reason text not null,
    row_data jsonb not null,
    rejected_at timestamptz not null default now()
);

with rejected as (
    delete from apalis.jobs
    where id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'
       or array_position(avals(metadata), null) is not null
       or run_at < '1970-01-01 00:00:00+00'
       or attempts < 0
       or max_attempts < 1
    returning *
)
insert into apalis.rejected_jobs (id, job_type, reason, row_data)
select id, job_type,
       case
           when id !~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$' then 'id is not a canonical ULID'
           when array_position(avals(metadata), null) is not null then 'metadata holds a NULL value'
           when run_at < '1970-01-01 00:00:00+00' then 'run_at is before 1970'
           else 'attempts below 0 or max_attempts below 1'
       end,
       to_jsonb(rejected) - 'job' || jsonb_build_object('job_base64', encode(job, 'base64'))
from rejected;

alter table apalis.jobs
    add constraint jobs_id_is_canonical_ulid check (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
    add constraint jobs_metadata_has_no_null_values check (array_position(avals(metadata), null) is null),
    add constraint jobs_run_at_after_1970 check (run_at >= '1970-01-01 00:00:00+00'),
    add constraint jobs_attempts_in_range check (attempts >= 0 and max_attempts >= 1);

drop index if exists apalis.jobs_one_pending_trim_visits;
