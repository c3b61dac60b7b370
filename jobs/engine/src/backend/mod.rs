//! The queue backend: how one job type's worker takes jobs from
//! `apalis.jobs` and gives their outcomes back. Knows nothing of the
//! runtime above it, only the schema, the job's declared backoff and the
//! worker name apalis hands it.
//!
//! # The life of a claimed job
//!
//! 1. **Woken.** An insert's trigger (once per statement and queue), the
//!    due-job waker, an operator's retry or a finished job's freed slot wakes
//!    the queue's worker; one LISTEN connection per process reads the
//!    notifications and wakes the queue named ([`wakeups`]). The poll
//!    interval wakes it too, so a lost notification costs one interval.
//! 2. **Claimed.** [`storage::claim`]: one statement, `apalis.get_jobs(..)`,
//!    for as many due jobs as the worker has free slots (two claims in flight
//!    while the queue has more). It share-locks the worker's row, takes rows
//!    `FOR UPDATE SKIP LOCKED` in priority then due order and marks them
//!    `Queued` with `lock_by` = the worker. A row that cannot be decoded is
//!    killed alone; a row that breaks a constraint makes the claim retry row
//!    by row (`apalis.claim_isolating_bad_rows`) and ends alone.
//! 3. **Started.** The runtime's stack runs the attempt; its start is
//!    reported as an event, and the next settle marks it `Running`.
//! 4. **Settled.** [`storage::record_events`]: every start and result since
//!    the last settle in one statement, fenced by the claim (only rows this
//!    worker still holds change): `Done` with its result, `Failed` with the
//!    retry's `run_at` (backoff with jitter), or `Killed` out of attempts.
//! 5. **Or lost.** A worker that stops heartbeating for a lease loses its
//!    jobs to the next worker's recovery ([`storage::recover_orphans`]),
//!    counting the lost attempt; attempts whose results never arrive from a
//!    live worker are the maintenance room's (lost-attempt reaper). On
//!    shutdown, claimed jobs that never started go back without using an
//!    attempt.

pub(crate) mod storage;
pub(crate) mod wakeups;
