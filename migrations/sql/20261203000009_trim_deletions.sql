-- What each trim job deleted (issue 21). A trim step's DELETE and its row here
-- commit in one transaction, so a re-run of the same job (same job id: its
-- acknowledgement was lost to a killed worker or a Postgres crash, and the
-- bookkeeping commits asynchronously) reads what it deleted instead of
-- recounting the nothing that is left: the summary's total stays exact, and
-- the ids whose log lines were never marked written (logged_at null) are
-- logged again. One row per job id; the trim job prunes rows older than a week.
create table trim_deletions (
    job_id text primary key,
    -- The visits deleted, and their ids ascending (empty for a planning job).
    deleted int not null default 0,
    ids bigint[] not null default '{}',
    -- A planning job's workflow (jobs::trim_visits::TrimPlan), null for a delete.
    plan jsonb,
    -- When every id's log line had been written to stdout.
    logged_at timestamptz,
    recorded_at timestamptz not null default now(),
    check (deleted = cardinality(ids))
);

create index trim_deletions_recorded_at_idx on trim_deletions (recorded_at);
