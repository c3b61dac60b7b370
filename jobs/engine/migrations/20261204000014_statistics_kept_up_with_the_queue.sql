-- The queue's statistics keep up with its size, with or without autovacuum.
--
-- A session keeps its plans (the bookkeeping pool forces generic ones) until
-- an ANALYZE of the table invalidates them. A plan made while the statistics
-- said the queue was empty (a queue drained and vacuumed, a new deployment)
-- walks the whole table, or a whole index, for every claim, settle and
-- reaping; with autovacuum off nothing analyzes the table again, and such
-- plans last for the session's life (measured: 3,000 jobs enqueued into a
-- queue vacuumed empty drained in 12 s instead of 5, reading 58 million rows
-- by sequential scans; beside 50,000 finished jobs they did not drain in two
-- minutes). Each worker asks every poll whether the table holds more than
-- four times the rows its statistics say (and more than 1,000): then one of
-- them analyzes it, which makes every session plan again. Growth from empty
-- to a million analyzes it six times. It gives up at once (and asks again
-- next poll) where it may not analyze the table or a vacuum holds it.
CREATE FUNCTION apalis.analyze_jobs_if_outgrown() RETURNS boolean
LANGUAGE plpgsql
SET lock_timeout = '100ms'
AS $$
BEGIN
    IF pg_stat_get_live_tuples('apalis.jobs'::regclass)
           <= 4 * greatest((SELECT reltuples FROM pg_class WHERE oid = 'apalis.jobs'::regclass), 0) + 1000
       -- Only the table's owner (or a superuser) may analyze it.
       OR NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'apalis.jobs'::regclass), 'MEMBER')
       -- One process at a time; the others then find the statistics fresh.
       OR NOT pg_try_advisory_xact_lock(hashtext('apalis.analyze_jobs_if_outgrown'))
    THEN
        RETURN false;
    END IF;
    ANALYZE apalis.jobs;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END
$$;
