-- At most one pending (not yet claimed) TrimVisits: a newer page view merges
-- its threshold into the pending job instead of queueing another (see
-- jobs::trim_visits). Claiming moves the row out of this index, so the next
-- page view starts a new pending job.
create unique index jobs_one_pending_trim_visits
    on apalis.jobs (job_type)
    where job_type = 'trim_visits' and status = 'Pending';

-- Side effects of `probe` jobs (jobs::probe): one row per execution, so
-- operators and tests can see exactly how often and where a job ran.
create table job_probe_runs (
    id bigint generated always as identity primary key,
    probe text not null,
    attempt int not null,
    worker text not null,
    started_at timestamptz not null default clock_timestamp(),
    finished_at timestamptz
);

create index job_probe_runs_probe_idx on job_probe_runs (probe);
