-- One definition of what an operator calls a job's state, for the `worker`
-- subcommands and the /admin dashboard: apalis's statuses plus run_at and
-- attempts ("Failed" with attempts left is a job waiting for its retry).
create view job_states as
select
    jobs.*,
    case
        when status = 'Pending' and run_at > now() then 'scheduled'
        when status = 'Pending' then 'pending'
        when status = 'Failed' and attempts < max_attempts then 'scheduled'
        when status = 'Queued' then 'claimed'
        when status = 'Running' then 'running'
        when status = 'Done' then 'done'
        else 'dead'
    end as state
from apalis.jobs;
