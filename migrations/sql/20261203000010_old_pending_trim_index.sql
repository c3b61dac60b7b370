-- VisitMe's queue before the engine kept at most one pending trim with a
-- unique index, which conflicted with recovered and retried trims (a crash
-- loop). The engine's first migration used to drop it; that step is
-- VisitMe's, so it is here (a no-op where it already ran).
drop index if exists apalis.jobs_one_pending_trim_visits;
