-- Periodic jobs: one row per schedule (a job type with a cron expression),
-- the cursor that makes each tick's job exactly once across worker processes.
--
-- A worker's scheduler locks the row, enqueues the jobs of the ticks after
-- handled_until (each with the idempotency key '<queue>@<tick>', unique per
-- job type in apalis.jobs), and moves handled_until to the database's clock,
-- all in one transaction: every tick falls into exactly one such interval.
-- Written to be re-run safely, like the engine's other migrations.
CREATE TABLE IF NOT EXISTS apalis.schedules (
    -- The queue (job type) whose jobs the schedule enqueues.
    name text PRIMARY KEY,
    -- The cron expression and catch-up policy, as the latest worker declared them.
    expression text NOT NULL,
    catch_up text NOT NULL,
    -- Every tick up to here has had its job enqueued, or was missed and
    -- handled by the catch-up policy.
    handled_until timestamptz NOT NULL,
    -- The newest tick that got a job, and that job.
    last_tick timestamptz,
    last_job_id text,
    -- The first tick after handled_until, for operators.
    next_tick timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
