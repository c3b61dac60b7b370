-- Side effects of `probe` jobs (the diagnostic job of VisitMe's tests and
-- benchmarks): one row per execution, so tests can see exactly how often and
-- where a job ran. Databases migrated before the engine existed have it from
-- migration 20261123000002 (the queue's parts of which moved to the engine).
create table if not exists job_probe_runs (
    id bigint generated always as identity primary key,
    probe text not null,
    attempt int not null,
    worker text not null,
    started_at timestamptz not null default clock_timestamp(),
    finished_at timestamptz
);

create index if not exists job_probe_runs_probe_idx on job_probe_runs (probe);
