//! The worker's queue backend: apalis-postgres's tables and claim function,
//! driven by a state machine of ours that claims by demand and settles in
//! batches, each running while jobs run.
//!
//! apalis-core's [`Persisted`] (which this backend used until the
//! queue-throughput work) runs one step at a time: claim a batch, hand it
//! out, record the round's events, claim again. Each step waits for the
//! last, so a no-op drain was bounded by the sum of two round trips per
//! batch, and a batch was sized by `WORKER_CLAIM_BATCH`, not by what the
//! worker could start (a larger batch waited in this worker's buffer while
//! other workers idled). That chain is the part of apalis this module
//! replaces; apalis still runs the worker (its service stack, concurrency,
//! `parallelize`, shutdown), and the schema, claim function, heartbeat and
//! shutdown hand-back stay apalis-postgres's.
//!
//! [`QueueStorage`] keeps three things in flight independently, each on its
//! own bookkeeping connection and tokio task (so that a round trip makes
//! progress while the worker's task hands out jobs):
//!
//! - **the claims** ([`claim`]): one statement each, `apalis.get_jobs(..)`,
//!   for as many jobs as the worker has free slots not already being
//!   claimed for, at most half the claim batch; two run at once, so one's
//!   round trip overlaps the other's jobs, and the next starts as soon as
//!   slots are free again, while the claimed jobs run. A worker so never
//!   holds a job it cannot start at once. A row that cannot be a task is
//!   killed alone.
//! - **the settle** ([`record_events`], `queries::RECORD_EVENTS`): every
//!   start mark and result that arrived since the last one, successes and
//!   failures (with their backoff) alike, in one statement, fenced by the
//!   claim: only rows this worker still holds, `Queued` or `Running`, change.
//!   While one settle runs, the next batch gathers.
//! - **the heartbeat** with orphan recovery ([`recover_orphans`]: jobs out of
//!   attempts end dead, and a failed recovery never kills the worker).
//!
//! It writes rows as apalis-postgres 1.0 does: status names as `Status`
//! displays them, `last_result` as `{"Ok": ..}` or `{"Err": ..}`. An upgrade
//! of apalis-postgres must check both, and `get_jobs`'s signature.
//!
//! [`Persisted`]: apalis_core::backend::persistence::Persisted

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    future::Future,
    pin::Pin,
    str::FromStr as _,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{
    Backend, BoxDynError, Codec, MetadataStore, Status, Task, TaskBuilder, TaskId, TaskResult,
    WorkerContext,
};
use apalis_core::backend::{
    BackendConfig, WireFormatBackend, finalize::Durable, future::BoxSyncFuture,
    persistence::TaskEvent,
};
use apalis_postgres::{Config, Error, PgPool, PgTask, queries as apalis_queries};
use tokio::sync::mpsc;
use tower::{Layer, Service};

use crate::{
    backend::wakeups::Wakeup,
    durable::Suspension,
    job::{Backoff, RetryAfter},
    queries,
    workflow::WORKFLOW_ID_KEY,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    Row as _,
    postgres::{PgRow, types::PgHstore},
};
use ulid::Ulid;

/// Decodes nothing: the handler receives the stored JSON bytes and decodes them
/// itself, so an undecodable payload fails only its own job (see `worker::handle`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPayload;

impl Codec<Vec<u8>> for RawPayload {
    type Error = Infallible;
    type Compact = Vec<u8>;
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
    fn decode(&self, value: &Vec<u8>) -> Result<Vec<u8>, Infallible> {
        Ok(value.clone())
    }
}

/// How long a claim for fewer than a quarter of the worker's slots waits for
/// more slots to free up (a job finishing), so that a flood of short jobs is
/// claimed in large batches, not one by one; a claim for a quarter or more
/// starts at once.
const TOP_UP_DELAY: Duration = Duration::from_millis(1);

/// Claims that may be in flight at once, each for at most its share of the
/// claim batch: while one claim's round trip runs, the other's jobs are
/// handed out and run (measured, 20,000 no-op jobs at 128 slots: 17-22k
/// jobs/s against 14-20k with one claim of 128 at a time).
const CLAIMS_IN_FLIGHT: usize = 2;

/// Settles that may run at once. One: while it runs, the next batch
/// gathers, so a settle's size follows the load. Two at once deadlocked in
/// a drain (a job's start mark in one batch, its result in the next, rows
/// locked in different orders by the two statements), and were no faster.
const SETTLES_IN_FLIGHT: usize = 1;

/// How often a worker claims from the whole queue while its claims start
/// past the last job it claimed (see [`ClaimKey`]): jobs that sort before
/// that key and were due without a notification (handed back by a stopping
/// worker, taken back from a lost one, skipped as locked by a claim that
/// then failed) wait at most this long.
const FULL_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// How soon after a notification (an enqueue, a resume, a release) a claim
/// is from the whole queue again: the new jobs may sort before the key (a
/// higher priority, an enqueue that committed late). Not at once: a worker
/// notified many times a second would walk the whole queue each time.
const FULL_CLAIM_AFTER_NOTICE: Duration = Duration::from_millis(100);

/// A claim in flight: the tasks it claimed, and the last of them in the
/// claim order.
type Claim = BoxSyncFuture<Result<Claimed, Error>>;

/// What a claim returned.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The claimed jobs, as tasks (rows that cannot be one are dead).
    pub tasks: Vec<PgTask>,
    /// The last claimed job in the claim order (including rows that could
    /// not be tasks): where the next claim may start.
    pub last: Option<ClaimKey>,
}

/// A job's place in the claim order, the claim index's (`priority DESC,
/// run_at, id`; see the engine's migration
/// `…0017_claims_start_past_what_they_claimed`). A claim given the key of the
/// last job its worker claimed first looks past it, so that it does not walk
/// the entries of every job claimed before, which a transaction held open
/// elsewhere keeps from being removed. Any claimed job's key is a safe start
/// (every job before it in the order was claimed, or locked by another
/// claim), so it does not matter that this type orders ids by bytes and
/// Postgres by the column's collation: the later of two keys is only the
/// shorter walk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClaimKey {
    priority: std::cmp::Reverse<i32>,
    run_at: DateTime<Utc>,
    id: String,
}

impl ClaimKey {
    fn of(row: &PgRow) -> Option<Self> {
        Some(Self {
            priority: std::cmp::Reverse(row.try_get("priority").ok()?),
            run_at: row.try_get("run_at").ok()?,
            id: row.try_get("id").ok()?,
        })
    }
}

/// A queue's backend for apalis workers. Build it with [`QueueStorage::new`];
/// see the module documentation for what it does.
#[derive(Debug)]
pub struct QueueStorage {
    pool: PgPool,
    /// This queue's notifications (see [`QueueStorage::woken`]).
    wakeup: Wakeup,
    poll_interval: Duration,
    poll_timer: Pin<Box<tokio::time::Sleep>>,
    config: Config,
    backoff: Backoff,
    /// Jobs the worker runs at once (its concurrency): the demand.
    slots: usize,
    /// Start marks and results from the worker's [`SettleLayer`].
    sender: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    registered: bool,
    register: Option<BoxSyncFuture<Result<(), Error>>>,
    heartbeat_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    heartbeat: Option<BoxSyncFuture<Result<(), Error>>>,
    /// Claims in flight, each with the number of jobs it asked for.
    claims: Vec<(Claim, usize)>,
    /// Whether the last claim got every job it asked for (the queue may
    /// hold more): the condition for a second claim in flight.
    queue_had_more: bool,
    /// A settle recorded results since the last empty claim: jobs of a
    /// limited queue that were held back (their key's or the queue's slots
    /// full) may be claimable now, so a parked worker claims again.
    slots_freed: bool,
    /// Claimed jobs not yet handed to the worker (only for slots that were
    /// free).
    buffer: VecDeque<PgTask>,
    /// Jobs handed to the worker whose result has not arrived yet.
    running: usize,
    /// Set while a small claim waits for more free slots (see [`TOP_UP_DELAY`]).
    top_up: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Where the next claim starts: the last job claimed, while claims get
    /// every job they ask for (see [`ClaimKey`]).
    claim_after: Option<ClaimKey>,
    /// When the last claim from the whole queue started.
    last_full_claim: tokio::time::Instant,
    /// A notification arrived since then.
    notified_since_full_claim: bool,
    unsettled: Vec<Event>,
    settles: Vec<BoxSyncFuture<Result<Recorded, Error>>>,
    hand_back: Option<BoxSyncFuture<Result<u64, Error>>>,
    dead: bool,
}

impl QueueStorage {
    /// A backend for the queue `config.queue` of a worker running `slots`
    /// jobs at once, doing its bookkeeping on `pool`; a claim takes at most
    /// `config.batch_size` jobs, failed attempts wait `backoff` before their
    /// retry, and a parked worker claims again on `wakeup` or every
    /// `poll_interval`.
    pub(crate) fn new(
        pool: &PgPool,
        config: Config,
        backoff: Backoff,
        slots: usize,
        wakeup: Wakeup,
        poll_interval: Duration,
    ) -> Self {
        let (sender, events) = mpsc::unbounded_channel();
        Self {
            wakeup,
            poll_interval,
            poll_timer: Box::pin(tokio::time::sleep(poll_interval)),
            pool: pool.clone(),
            config,
            backoff,
            slots: slots.max(1),
            sender,
            events,
            registered: false,
            register: None,
            heartbeat_timer: None,
            heartbeat: None,
            claims: Vec::new(),
            queue_had_more: false,
            slots_freed: false,
            buffer: VecDeque::new(),
            running: 0,
            top_up: None,
            claim_after: None,
            last_full_claim: tokio::time::Instant::now(),
            notified_since_full_claim: false,
            unsettled: Vec::new(),
            settles: Vec::new(),
            hand_back: None,
            dead: false,
        }
    }

    fn lease_seconds(&self) -> u64 {
        self.config.orphaned_duration().as_secs()
    }

    /// Moves every event that arrived into the next settle; a result frees
    /// its slot.
    fn drain_events(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(event)) = self.events.poll_recv(cx) {
            if matches!(event.event, TaskEvent::Complete(_)) {
                self.running = self.running.saturating_sub(1);
            }
            self.unsettled.push(event);
        }
    }

    /// Drives the settles in flight, and starts the next one with everything
    /// that arrived meanwhile while fewer than [`SETTLES_IN_FLIGHT`] run.
    fn poll_settle(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Result<(), Error> {
        loop {
            let mut failure = None;
            self.settles
                .retain_mut(|settle| match settle.poll_unpin(cx) {
                    Poll::Pending => true,
                    Poll::Ready(result) => {
                        match result {
                            Err(error) => {
                                failure.get_or_insert(error);
                            }
                            Ok(recorded) => self.slots_freed |= recorded.finished > 0,
                        }
                        false
                    }
                });
            if let Some(error) = failure {
                return Err(error);
            }
            if self.unsettled.is_empty() || self.settles.len() >= SETTLES_IN_FLIGHT {
                return Ok(());
            }
            let events = std::mem::take(&mut self.unsettled);
            let (pool, name, backoff) = (self.pool.clone(), worker.name().to_owned(), self.backoff);
            self.settles.push(spawned(async move {
                record_round(&pool, EventRound::from(events), &name, backoff).await
            }));
        }
    }

    /// Drives registration (first) and the heartbeat, which runs beside
    /// claims and settles. `Pending` until the worker is registered.
    fn poll_liveness(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        if !self.registered {
            if self.register.is_none() {
                let (pool, queue, lease) = (
                    self.pool.clone(),
                    self.config.queue.to_string(),
                    self.lease_seconds(),
                );
                let (name, layers) = (worker.name().to_owned(), worker.get_service().to_owned());
                self.register = Some(spawned(async move {
                    register(&pool, &queue, &name, &layers, lease).await
                }));
            }
            let register = self.register.as_mut().expect("set above");
            match register.poll_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    self.register = None;
                    result?;
                    self.registered = true;
                    worker.heartbeat(cx);
                    self.heartbeat_timer =
                        Some(Box::pin(tokio::time::sleep(self.config.heartbeat_interval)));
                }
            }
        }
        if self.heartbeat.is_none()
            && let Some(timer) = self.heartbeat_timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            let (pool, queue, lease) = (
                self.pool.clone(),
                self.config.queue.to_string(),
                self.lease_seconds(),
            );
            let worker = worker.clone();
            self.heartbeat = Some(spawned(async move {
                apalis_queries::keep_alive(&mut *pool.acquire().await?, &queue, &worker).await?;
                recover_orphans_logged(&pool, &queue, lease).await;
                Ok(())
            }));
        }
        if let Some(heartbeat) = self.heartbeat.as_mut()
            && let Poll::Ready(result) = heartbeat.poll_unpin(cx)
        {
            self.heartbeat = None;
            result?;
            worker.heartbeat(cx);
            self.heartbeat_timer =
                Some(Box::pin(tokio::time::sleep(self.config.heartbeat_interval)));
        }
        Poll::Ready(Ok(()))
    }

    /// Whether to claim now, and for how many jobs: the free slots, capped by
    /// the claim batch; a claim for a few slots while jobs run first waits a
    /// moment for more (see [`TOP_UP_DELAY`]).
    fn demand(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let claiming: usize = self.claims.iter().map(|(_, asked)| asked).sum();
        let free = self
            .slots
            .saturating_sub(self.running + self.buffer.len() + claiming);
        if free == 0 {
            return None;
        }
        if self.running > 0 && free * 4 < self.slots {
            let top_up = self
                .top_up
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(TOP_UP_DELAY)));
            if top_up.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
        self.top_up = None;
        let per_claim = self.config.batch_size.div_ceil(CLAIMS_IN_FLIGHT).max(1);
        Some(free.min(per_claim))
    }

    /// Whether a wake-up came since the last call: a notification for this
    /// queue, or the poll interval. Both are left registered with `cx`, so a
    /// worker that parks after an empty claim is woken by the next one.
    ///
    /// apalis's poll strategies (which this backend used before) returned a
    /// notification without registering for the next, and re-armed their
    /// interval without polling it: a worker whose empty claim completed
    /// within one poll parked with no waker at all, and a batch then waited
    /// for the next heartbeat (measured: 1 drain in 4 started 10 s late).
    fn woken(&mut self, cx: &mut Context<'_>) -> bool {
        let mut woken = false;
        // `None`: the listener is gone (shutdown); the interval still polls.
        while let Poll::Ready(Some(())) = futures::Stream::poll_next(Pin::new(&mut self.wakeup), cx)
        {
            woken = true;
        }
        if self.poll_timer.as_mut().poll(cx).is_ready() {
            woken = true;
            let next = tokio::time::Instant::now() + self.poll_interval;
            self.poll_timer.as_mut().reset(next);
            // Registers the re-armed timer; it cannot be due yet.
            let _ = self.poll_timer.as_mut().poll(cx);
        }
        woken
    }

    /// Where the next claim starts: past the last job claimed, or (`None`)
    /// at the beginning of the queue, when a notification came at least
    /// [`FULL_CLAIM_AFTER_NOTICE`] ago or the last such claim was
    /// [`FULL_CLAIM_EVERY`] ago. Reads the notifications that arrived: the
    /// claim it precedes finds their jobs (or the next full one does).
    fn claim_start(&mut self, cx: &mut Context<'_>) -> Option<ClaimKey> {
        while let Poll::Ready(Some(())) = futures::Stream::poll_next(Pin::new(&mut self.wakeup), cx)
        {
            self.notified_since_full_claim = true;
        }
        let since = self.last_full_claim.elapsed();
        if self.claim_after.is_none()
            || since >= FULL_CLAIM_EVERY
            || (self.notified_since_full_claim && since >= FULL_CLAIM_AFTER_NOTICE)
        {
            self.claim_after = None;
            self.notified_since_full_claim = false;
            self.last_full_claim = tokio::time::Instant::now();
            return None;
        }
        self.claim_after.clone()
    }

    fn fail(&mut self, error: Error) -> Error {
        tracing::warn!(queue = %self.config.queue, error = %error, "queue bookkeeping failed; the worker stops");
        self.dead = true;
        error
    }
}

/// Runs a bookkeeping step on its own tokio task, so that its round trip
/// makes progress while the worker's task is busy handing out jobs.
fn spawned<T: Send + 'static>(
    step: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> BoxSyncFuture<Result<T, Error>> {
    let task = tokio::spawn(step);
    BoxSyncFuture::new(Box::pin(async move {
        // A step that panicked did not finish; the worker stops as on a
        // database error.
        task.await
            .unwrap_or(Err(Error::Database(sqlx::Error::WorkerCrashed)))
    }))
}

/// Registers `name` as a worker of `queue`, after recovering the jobs of the
/// queue's lost workers.
async fn register(
    pool: &PgPool,
    queue: &str,
    name: &str,
    layers: &str,
    lease_seconds: u64,
) -> Result<(), Error> {
    recover_orphans_logged(pool, queue, lease_seconds).await;
    let inserted = sqlx::query(queries::REGISTER_WORKER)
        .bind(name)
        .bind(queue)
        .bind(layers)
        .execute(pool)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Err(Error::WorkerAlreadyExists(name.to_owned()));
    }
    Ok(())
}

impl Backend for QueueStorage {
    type Task = PgTask;
    type Error = Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        if self.dead {
            return Poll::Ready(Ok(()));
        }
        match self.poll_liveness(cx, worker) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(self.fail(error))),
            Poll::Ready(Ok(())) => {}
        }
        self.drain_events(cx);
        if let Err(error) = self.poll_settle(cx, worker) {
            return Poll::Ready(Err(self.fail(error)));
        }
        Poll::Ready(Ok(()))
    }

    /// Called by apalis only when the worker has a free slot.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<PgTask, Error>>> {
        loop {
            if self.dead {
                return Poll::Ready(None);
            }
            if let Some(task) = self.buffer.pop_front() {
                self.running += 1;
                return Poll::Ready(Some(Ok(task)));
            }
            let mut drained = false;
            let mut index = 0;
            while index < self.claims.len() {
                match self.claims[index].0.poll_unpin(cx) {
                    Poll::Pending => index += 1,
                    Poll::Ready(result) => {
                        let (_, asked) = self.claims.swap_remove(index);
                        match result {
                            Err(error) => return Poll::Ready(Some(Err(self.fail(error)))),
                            Ok(Claimed { tasks, last }) => {
                                drained |= tasks.is_empty();
                                self.queue_had_more = tasks.len() >= asked;
                                // A short claim read the whole queue: the
                                // next starts from the beginning too.
                                self.claim_after = if self.queue_had_more {
                                    self.claim_after.take().max(last)
                                } else {
                                    None
                                };
                                self.buffer.extend(tasks);
                            }
                        }
                    }
                }
            }
            if !self.buffer.is_empty() {
                continue;
            }
            // A second claim only while the queue had more than the last
            // claim took: a parked worker that is woken claims once.
            if self.claims.len() >= CLAIMS_IN_FLIGHT
                || (!self.claims.is_empty() && !self.queue_had_more)
            {
                return Poll::Pending;
            }
            if drained && !self.woken(cx) && !std::mem::take(&mut self.slots_freed) {
                // Parked until a notification, the poll interval, a claim
                // in flight, a job finishing or its settle wakes the worker.
                return Poll::Pending;
            }
            self.drain_events(cx);
            let Some(count) = self.demand(cx) else {
                return Poll::Pending;
            };
            let after = self.claim_start(cx);
            let (pool, config, name) = (self.pool.clone(), self.config.clone(), worker.name());
            let name = name.to_owned();
            // Polled on the worker's own task, which waits for it anyway: a
            // spawned claim cost each pickup a wake-up across threads.
            self.claims.push((
                BoxSyncFuture::new(Box::pin(async move {
                    claim(&pool, &config, &name, count, after.as_ref()).await
                })),
                count,
            ));
        }
    }

    /// Finishes the claims in flight, hands unstarted jobs back to the queue
    /// and settles every event before the worker stops.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        self.top_up = None;
        let mut index = 0;
        while index < self.claims.len() {
            match self.claims[index].0.poll_unpin(cx) {
                Poll::Pending => index += 1,
                Poll::Ready(result) => {
                    self.claims.swap_remove(index);
                    // A failed claim claimed nothing (one statement).
                    self.buffer.extend(result.unwrap_or_default().tasks);
                }
            }
        }
        if !self.claims.is_empty() {
            return Poll::Pending;
        }
        if !self.buffer.is_empty() && self.hand_back.is_none() {
            let tasks: Vec<PgTask> = self.buffer.drain(..).collect();
            let ids: Vec<String> = tasks
                .iter()
                .filter_map(|task| task.task_id().map(ToString::to_string))
                .collect();
            let (pool, queue, name) = (
                self.pool.clone(),
                self.config.queue.to_string(),
                worker.name().to_owned(),
            );
            self.hand_back = Some(spawned(async move {
                apalis_queries::reenqueue_abandoned(
                    &mut *pool.acquire().await?,
                    &queue,
                    &name,
                    &ids,
                )
                .await
            }));
        }
        if let Some(hand_back) = self.hand_back.as_mut() {
            match hand_back.poll_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    self.hand_back = None;
                    result?;
                }
            }
        }
        if let Some(heartbeat) = self.heartbeat.as_mut() {
            if heartbeat.poll_unpin(cx).is_pending() {
                return Poll::Pending;
            }
            self.heartbeat = None;
        }
        self.drain_events(cx);
        self.poll_settle(cx, worker)?;
        if !self.settles.is_empty() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

/// The worker's middleware that reports each job's start and result to its
/// [`QueueStorage`] (apalis-core's `TaskPersistLayer` does the same for
/// `Persisted`; its channel cannot be read by another backend).
#[derive(Debug, Clone)]
pub struct SettleLayer {
    sender: mpsc::UnboundedSender<Event>,
}

impl<S> Layer<S> for SettleLayer {
    type Service = SettleService<S>;
    fn layer(&self, inner: S) -> SettleService<S> {
        SettleService {
            inner,
            sender: self.sender.clone(),
        }
    }
}

/// The service installed by [`SettleLayer`].
#[derive(Debug, Clone)]
pub struct SettleService<S> {
    inner: S,
    sender: mpsc::UnboundedSender<Event>,
}

impl<S, Args> Service<Task<Args>> for SettleService<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
    S::Response: serde::Serialize + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let ctx = task.ctx().clone();
        let sender = self.sender.clone();
        let task_id = ctx.task_id().cloned();
        if let Some(task_id) = task_id.clone() {
            // A closed channel means the backend is gone; the result is then
            // lost as after a crash, and the lease returns the job.
            let _ = sender.send(Event {
                event: TaskEvent::Lock { task_id },
                resume: Resume::Backoff,
                trace: None,
            });
        }
        let run = self.inner.call(task);
        Box::pin(async move {
            let result = run.await.map_err(Into::into);
            if let Some(task_id) = task_id {
                let outcome = match &result {
                    Ok(response) => serde_json::to_value(response).map_err(|err| err.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                // A job's own `JobError::retry_after` replaces the backoff;
                // a suspended job waits for its time instead.
                let retry_in = match result.as_ref().err() {
                    Some(error) => Resume::of(&**error),
                    None => Resume::Backoff,
                };
                // A workflow step's attempt: its span, for its dependents' links.
                let trace = ctx
                    .data()
                    .get::<AttemptTrace>()
                    .and_then(|trace| trace.0.get().cloned());
                let _ = sender.send(Event {
                    event: TaskEvent::Complete(TaskResult {
                        task_id,
                        attempt: ctx.attempt(),
                        status: ctx.status(),
                        result: outcome,
                    }),
                    resume: retry_in,
                    trace,
                });
            }
            result
        })
    }
}

impl BackendConfig for QueueStorage {
    type Args = Vec<u8>;
    type Id = Ulid;
    type Kind = Durable;
    type Config = Config;
    type Layer = SettleLayer;

    fn config(&self) -> &Config {
        &self.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> SettleLayer {
        SettleLayer {
            sender: self.sender.clone(),
        }
    }
}

/// What one round of task events changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Results recorded (jobs this worker still held).
    pub finished: i64,
    /// Jobs marked `Running` (claimed by this worker, not yet started).
    pub started: i64,
}

/// Records one round of `worker`'s task events (see [`queries::RECORD_EVENTS`]):
/// results of jobs it still holds, and starts of jobs it claimed. Events about
/// jobs it no longer holds (recovered by another worker meanwhile) change
/// nothing.
pub async fn record_events(
    pool: &PgPool,
    events: Vec<TaskEvent<Value>>,
    worker: &str,
    backoff: Backoff,
) -> Result<Recorded, Error> {
    record_round(pool, EventRound::from(events), worker, backoff).await
}

/// Records one round (see [`record_events`]).
async fn record_round(
    pool: &PgPool,
    round: EventRound,
    worker: &str,
    backoff: Backoff,
) -> Result<Recorded, Error> {
    if round.is_empty() {
        return Ok(Recorded::default());
    }
    // A settle that ends workflow steps also releases their dependents (the
    // engine's trigger), locking those rows; two settles ending steps of two
    // workflows in opposite orders can deadlock, and Postgres then aborts one.
    // The statement is fenced (rows this worker still holds), so running it
    // again is safe: try a few times before it costs the worker its life.
    let mut tries = 0;
    loop {
        let settled = sqlx::query_as(queries::RECORD_EVENTS)
            .bind(&round.finished_ids)
            .bind(&round.attempts)
            .bind(&round.statuses)
            .bind(&round.outcomes)
            .bind(&round.started_ids)
            .bind(worker)
            .bind(backoff.base.as_secs_f64())
            .bind(backoff.max.as_secs_f64())
            .bind(&round.retry_in)
            .bind(i32::try_from(backoff.doublings()).unwrap_or(30))
            .bind(&round.suspended_for)
            .bind(&round.traceparents)
            .fetch_one(pool)
            .await;
        match settled {
            Ok((finished, started)) => {
                wake_arrived(pool, &round).await?;
                return Ok(Recorded { finished, started });
            }
            Err(sqlx::Error::Database(err))
                if tries < SETTLE_RETRIES
                    && matches!(err.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tries += 1;
                tracing::warn!(worker, error = %err, "settling job results conflicted; trying again");
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Wakes the jobs this round suspended whose signal or child arrived before
/// the round committed (`queries::WAKE_SUSPENDED`).
async fn wake_arrived(pool: &PgPool, round: &EventRound) -> Result<(), Error> {
    let (ids, waiting_for): (Vec<&str>, Vec<&str>) = round
        .finished_ids
        .iter()
        .zip(&round.suspended_for)
        .filter_map(|(id, waiting)| Some((id.as_str(), waiting.as_deref()?)))
        .filter(|(_, waiting)| !waiting.starts_with("sleep:"))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(queries::WAKE_SUSPENDED)
        .bind(&ids)
        .bind(&waiting_for)
        .execute(pool)
        .await?;
    Ok(())
}

/// Settles tried again after a deadlock or serialization failure.
const SETTLE_RETRIES: u32 = 3;

/// Claims up to `count` due jobs of the queue (our plan-caching
/// `apalis.get_jobs`) and turns each row into a task on its own.
///
/// apalis-postgres decodes a claimed batch as a whole: one row whose id is not
/// a ULID, whose metadata holds a NULL value or whose `run_at` is before 1970
/// failed every job of the batch, and the worker with it, every lease, until
/// it gave up. Here a row that cannot become a task is killed alone, with the
/// reason in `last_result`, and the rest of the batch runs.
pub async fn claim(
    pool: &PgPool,
    config: &Config,
    worker: &str,
    count: usize,
    after: Option<&ClaimKey>,
) -> Result<Claimed, Error> {
    let claim = |statement| {
        sqlx::query(statement)
            .bind(worker)
            .bind(config.queue.as_ref())
            .bind(i32::try_from(count).unwrap_or(i32::MAX))
    };
    let claimed = claim(queries::CLAIM)
        .bind(after.map(|key| key.priority.0))
        .bind(after.map(|key| key.run_at))
        .bind(after.map(|key| key.id.as_str()))
        .fetch_all(pool)
        .await;
    let rows = match claimed {
        Ok(rows) => rows,
        // One row that breaks a constraint (one added NOT VALID over it)
        // fails the batch's UPDATE: claim row by row, ending such rows.
        Err(sqlx::Error::Database(error))
            if is_integrity_violation(&*error)
                && !error.message().contains("is not registered") =>
        {
            tracing::warn!(queue = %config.queue, error = %error, "the claim failed on a job row that breaks a constraint; claiming row by row");
            claim(queries::CLAIM_ISOLATING_BAD_ROWS)
                .fetch_all(pool)
                .await?
        }
        Err(error) => return Err(error.into()),
    };
    let mut tasks = Vec::with_capacity(rows.len());
    let (mut rejected_ids, mut reasons) = (Vec::new(), Vec::new());
    let last = rows.iter().filter_map(ClaimKey::of).max();
    for row in &rows {
        match task_from_row(row) {
            Ok(task) => tasks.push(task),
            Err(reason) => {
                let id: String = row.try_get("id").unwrap_or_default();
                tracing::error!(job.id = %id, queue = %config.queue, reason = %reason, "job row cannot be run; it is dead");
                metrics::counter!("durable_jobs_dead_total", "queue" => config.queue.to_string())
                    .increment(1);
                rejected_ids.push(id);
                reasons.push(format!("corrupt job row: {reason}"));
            }
        }
    }
    if !rejected_ids.is_empty() {
        sqlx::query(queries::KILL_REJECTED)
            .bind(&rejected_ids)
            .bind(&reasons)
            .bind(worker)
            .execute(pool)
            .await?;
    }
    Ok(Claimed { tasks, last })
}

/// Whether `error` is an integrity violation (SQLSTATE class 23): a check,
/// not-null, unique, exclusion or foreign-key constraint.
fn is_integrity_violation(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.code().is_some_and(|code| code.starts_with("23"))
}

/// One claimed row as a task, or why it cannot be one. Every column is read on
/// its own, so that no value of one row can fail another.
fn task_from_row(row: &PgRow) -> Result<PgTask, String> {
    fn column<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
        row: &'r PgRow,
        name: &str,
    ) -> Result<T, String> {
        row.try_get(name)
            .map_err(|err| format!("column {name}: {err}"))
    }
    let id: String = column(row, "id")?;
    let ulid = Ulid::from_string(&id).map_err(|err| format!("id {id:?} is not a ULID: {err}"))?;
    if ulid.to_string() != id {
        return Err(format!("id {id:?} is not a canonical (upper-case) ULID"));
    }
    let payload: Vec<u8> = column(row, "job")?;
    let queue: String = column(row, "job_type")?;
    let attempts: i32 = column(row, "attempts")?;
    let max_attempts: i32 = column(row, "max_attempts")?;
    let attempts =
        usize::try_from(attempts).map_err(|_| format!("attempts is {attempts}, below zero"))?;
    let max_attempts = usize::try_from(max_attempts)
        .ok()
        .filter(|max| *max >= 1)
        .ok_or_else(|| format!("max_attempts is {max_attempts}, below one"))?;
    let run_at: DateTime<Utc> = column(row, "run_at")?;
    let run_at =
        u64::try_from(run_at.timestamp()).map_err(|_| format!("run_at {run_at} is before 1970"))?;
    let seconds = |at: Option<DateTime<Utc>>| at.and_then(|at| u64::try_from(at.timestamp()).ok());
    let lock_at: Option<DateTime<Utc>> = column(row, "lock_at")?;
    let done_at: Option<DateTime<Utc>> = column(row, "done_at")?;
    let lock_by: Option<String> = column(row, "lock_by")?;
    let priority: i32 = column(row, "priority")?;
    let idempotency_key: Option<String> = column(row, "idempotency_key")?;
    let metadata: Option<PgHstore> = column(row, "metadata")?;
    let mut entries = HashMap::new();
    for (key, value) in metadata.into_iter().flatten() {
        let value = value.ok_or_else(|| format!("metadata key {key:?} holds NULL"))?;
        entries.insert(key, value);
    }
    let status = Status::from_str(&column::<String>(row, "status")?)
        .map_err(|err| format!("status: {err}"))?;
    let step = entries.contains_key(WORKFLOW_ID_KEY);
    let mut task = TaskBuilder::new(payload)
        .task_id(TaskId::from_ulid(ulid))
        .queue(queue.into())
        .status(status)
        .attempt(attempts)
        .max_attempts(max_attempts)
        .run_at_timestamp(run_at)
        .lock_at(seconds(lock_at))
        .done_at(seconds(done_at))
        .lock_by(lock_by)
        .priority(usize::try_from(priority).unwrap_or_default())
        .with_metadata(MetadataStore::from_map(entries));
    if let Some(key) = idempotency_key {
        task = task.idempotency_key(key);
    }
    if step {
        task = task.data(AttemptTrace::default());
    }
    Ok(task.build())
}

/// Recovers the jobs of `queue`'s lost workers (see `queries::RECOVER_ORPHANS`).
pub async fn recover_orphans(pool: &PgPool, queue: &str, lease_seconds: u64) -> Result<u64, Error> {
    let recovered = sqlx::query(queries::RECOVER_ORPHANS)
        .bind(lease_seconds as f64)
        .bind(queue)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(recovered)
}

async fn recover_orphans_logged(pool: &PgPool, queue: &str, lease_seconds: u64) {
    match recover_orphans(pool, queue, lease_seconds).await {
        Ok(0) => {}
        Ok(recovered) => tracing::warn!(
            queue,
            jobs.recovered = recovered,
            "took over jobs of workers that stopped heartbeating"
        ),
        Err(err) => {
            tracing::warn!(queue, error = %err, "recovering lost workers' jobs failed; will retry")
        }
    }
}

/// One round of task events as the columns `RECORD_EVENTS` binds.
#[derive(Debug, Default, PartialEq)]
struct EventRound {
    finished_ids: Vec<String>,
    attempts: Vec<i32>,
    statuses: Vec<String>,
    outcomes: Vec<Value>,
    /// Seconds until the retry, where the job named them (else the backoff's),
    /// or until a suspended job is due.
    retry_in: Vec<Option<f64>>,
    /// What each suspended job waits for (NULL: not suspended).
    suspended_for: Vec<Option<String>>,
    /// Each workflow step's attempt's traceparent (NULL: not a step).
    traceparents: Vec<Option<String>>,
    started_ids: Vec<String>,
}

/// A start mark or result from the [`SettleLayer`].
#[derive(Debug)]
struct Event {
    event: TaskEvent<Value>,
    /// How the job goes on (for a result).
    resume: Resume,
    /// A workflow step's attempt's traceparent (for a result; see [`AttemptTrace`]).
    trace: Option<String>,
}

/// Where a workflow step's attempt leaves the traceparent of its span (set
/// by `JobSpanLayer`, read by the [`SettleLayer`] with the result), so that
/// the settle that ends the step records it for its dependents' links, with
/// no write of its own at the attempt's start.
#[derive(Debug, Clone, Default)]
pub(crate) struct AttemptTrace(pub(crate) std::sync::Arc<std::sync::OnceLock<String>>);

/// When a finished attempt's job is due again.
#[derive(Debug, Clone, Default, PartialEq)]
enum Resume {
    /// After the backoff (if it failed).
    #[default]
    Backoff,
    /// After the delay the job asked for (`JobError::retry_after`).
    After(Duration),
    /// Suspended (a durable sleep or wait): waiting again, due in at most
    /// `wake_in`, using no attempt.
    Suspended {
        wake_in: Duration,
        waiting_for: String,
    },
}

impl Resume {
    fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        if let Some(suspension) = error.downcast_ref::<Suspension>() {
            return Self::Suspended {
                wake_in: suspension.wake_in,
                waiting_for: suspension.waiting_for.clone(),
            };
        }
        match error.downcast_ref::<RetryAfter>() {
            Some(retry) => Self::After(retry.delay),
            None => Self::Backoff,
        }
    }
}

impl EventRound {
    fn is_empty(&self) -> bool {
        self.finished_ids.is_empty() && self.started_ids.is_empty()
    }
}

impl From<Vec<TaskEvent<Value>>> for EventRound {
    fn from(events: Vec<TaskEvent<Value>>) -> Self {
        events
            .into_iter()
            .map(|event| Event {
                event,
                resume: Resume::Backoff,
                trace: None,
            })
            .collect::<Vec<Event>>()
            .into()
    }
}

impl From<Vec<Event>> for EventRound {
    /// Results are sorted by id, so that concurrent writers lock rows in one
    /// order; a job that started and finished in the same round needs no
    /// start mark.
    fn from(events: Vec<Event>) -> Self {
        let mut results: Vec<(TaskResult<Value>, Resume, Option<String>)> = Vec::new();
        let mut started_ids = Vec::new();
        for Event {
            event,
            resume,
            trace,
        } in events
        {
            match event {
                TaskEvent::Complete(result) => results.push((result, resume, trace)),
                TaskEvent::Lock { task_id } => started_ids.push(task_id.to_string()),
                _ => {}
            }
        }
        results.sort_by_key(|(result, _, _)| result.task_id.to_string());
        let mut round = Self::default();
        for (result, resume, trace) in results {
            round.traceparents.push(trace);
            let (retry_in, suspended_for) = match resume {
                Resume::Backoff => (None, None),
                Resume::After(delay) => (Some(delay.as_secs_f64()), None),
                Resume::Suspended {
                    wake_in,
                    waiting_for,
                } => (Some(wake_in.as_secs_f64()), Some(waiting_for)),
            };
            round.retry_in.push(retry_in);
            round.suspended_for.push(suspended_for);
            round.finished_ids.push(result.task_id.to_string());
            round
                .attempts
                .push(i32::try_from(result.attempt).unwrap_or(i32::MAX));
            round.statuses.push(result.status.to_string());
            // The shape apalis stores: {"Ok": value} or {"Err": message}.
            round.outcomes.push(match result.result {
                Ok(value) => serde_json::json!({ "Ok": value }),
                Err(message) => serde_json::json!({ "Err": message }),
            });
        }
        let finished: std::collections::HashSet<&String> = round.finished_ids.iter().collect();
        started_ids.retain(|started| !finished.contains(started));
        round.started_ids = started_ids;
        round
    }
}

impl WireFormatBackend for QueueStorage {
    type Codec = RawPayload;
    type Compact = Vec<u8>;

    fn codec(&self) -> &RawPayload {
        &RawPayload
    }
}

#[cfg(test)]
mod tests {
    use apalis::prelude::{Status, TaskId};

    use super::*;

    fn id(n: u128) -> TaskId {
        TaskId::from_ulid(Ulid::from(n))
    }

    #[test]
    fn a_round_sorts_results_and_drops_start_marks_of_finished_jobs() {
        let events = vec![
            TaskEvent::Lock { task_id: id(2) },
            TaskEvent::Lock { task_id: id(1) },
            TaskEvent::Lock { task_id: id(3) },
            TaskEvent::Complete(TaskResult {
                task_id: id(2),
                attempt: 1,
                status: Status::Done,
                result: Ok(Value::Null),
            }),
            TaskEvent::Complete(TaskResult {
                task_id: id(1),
                attempt: 3,
                status: Status::Failed,
                result: Err("boom".to_owned()),
            }),
        ];
        let round = EventRound::from(events);
        assert_eq!(round.finished_ids, [id(1).to_string(), id(2).to_string()]);
        assert_eq!(round.attempts, [3, 1]);
        assert_eq!(round.statuses, ["Failed", "Done"]);
        assert_eq!(
            round.outcomes,
            [
                serde_json::json!({"Err": "boom"}),
                serde_json::json!({"Ok": null})
            ]
        );
        assert_eq!(round.started_ids, [id(3).to_string()]);
    }
}
