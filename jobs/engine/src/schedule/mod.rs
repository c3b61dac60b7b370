//! Periodic jobs: a [`Schedule`] declared with a job type's registration
//! ([`crate::Registry::schedule`]) enqueues one job per tick, exactly once
//! however many worker processes run. (The engine's own periodic job,
//! `prune_jobs`, is the maintenance room's.) Knows nothing of the runtime:
//! the runtime hands it the schedules to keep.
//!
//! Every worker process runs a scheduler per schedule. It sleeps until the
//! next tick, then, in one transaction: locks the schedule's row in
//! `apalis.schedules`, enqueues the jobs of the ticks after the row's
//! `handled_until` up to the database's clock, and moves `handled_until` to
//! that clock. Each tick falls into exactly one such interval, whichever
//! process gets the lock first; the job's idempotency key `<queue>@<tick>`
//! (unique in `apalis.jobs`) makes a second job for a tick impossible even
//! if the row were lost. apalis-cron, by contrast, enqueues each tick once
//! per process.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use ulid::Ulid;

use crate::{enqueue::producer_span, error::Error, job::Job, queries};

/// When a periodic job runs: a cron expression with seconds, in UTC, and
/// what happens to ticks missed while no worker ran ([`CatchUp`]).
///
/// ```
/// use durable_jobs::{CatchUp, Schedule};
///
/// // At 03:00:00 UTC every day; after downtime, one run for the missed days.
/// let nightly = Schedule::cron("0 0 3 * * *")?.catch_up(CatchUp::RunOnce);
/// assert_eq!(nightly.expression(), "0 0 3 * * *");
/// assert!(Schedule::cron("0 3 * * *").is_err(), "seconds are not optional");
/// # Ok::<(), durable_jobs::Error>(())
/// ```
#[derive(Clone)]
pub struct Schedule {
    expression: String,
    cron: Cron,
    catch_up: CatchUp,
    grace: Duration,
}

/// What a scheduler does with ticks that no worker enqueued within the
/// schedule's grace ([`Schedule::grace`]), because none was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CatchUp {
    /// Missed ticks get no job; the schedule goes on with the next tick.
    #[default]
    Skip,
    /// Missed ticks get one job between them, enqueued as soon as a worker
    /// runs: the job of the latest missed tick, whose [`Tick::previous`]
    /// says since when it stands in.
    RunOnce,
}

impl CatchUp {
    /// The policy's name, as `apalis.schedules` and `worker status` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
        }
    }
}

/// How late a tick's job may be enqueued and still count as on time, by
/// default: a worker restart around a tick delays its job instead of
/// missing it.
const DEFAULT_GRACE: Duration = Duration::from_secs(60);

impl Schedule {
    /// A schedule from a cron expression of six fields, seconds first:
    /// `second minute hour day-of-month month day-of-week`, in UTC (e.g.
    /// `0 * * * * *`: every minute; `0 30 2 * * MON-FRI`: 02:30 on weekdays;
    /// day-of-week 0 or 7 is Sunday). Missed ticks are skipped.
    ///
    /// # Errors
    /// [`Error::Schedule`] if the expression does not parse or never matches.
    pub fn cron(expression: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Schedule {
            expression: expression.to_owned(),
            reason,
        };
        // croner counts fields too, but its messages name its other modes.
        let fields = expression.split_whitespace().count();
        if fields != 6 {
            return Err(invalid(format!("it has {fields} fields, not 6")));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|err| invalid(err.to_string()))?;
        // "0 0 0 30 2 *" parses, but no tick would ever come.
        cron.find_next_occurrence(&Utc::now(), false)
            .map_err(|_| invalid("it never matches a time".to_owned()))?;
        Ok(Self {
            expression: expression.trim().to_owned(),
            cron,
            catch_up: CatchUp::default(),
            grace: DEFAULT_GRACE,
        })
    }

    /// What happens to missed ticks (default: [`CatchUp::Skip`]).
    pub fn catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// How late a tick may be enqueued and still get its own job (default:
    /// a minute). A tick later than that was missed: no worker ran at its
    /// time, and [`CatchUp`] decides.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The cron expression, as given.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first tick strictly after `time`.
    pub fn next_after(&self, time: DateTime<Utc>) -> Result<DateTime<Utc>, Error> {
        // Ticks are whole seconds; croner is asked about whole seconds only,
        // so that its handling of fractions cannot matter.
        let floor = whole_second_floor(time);
        self.cron
            .find_next_occurrence(&floor, false)
            .map_err(|err| self.error(err))
    }

    /// The last tick strictly before `time`.
    fn last_before(&self, time: DateTime<Utc>) -> Result<DateTime<Utc>, Error> {
        let floor = whole_second_floor(time);
        let found = if floor < time {
            self.cron.find_previous_occurrence(&floor, true)
        } else {
            self.cron.find_previous_occurrence(&floor, false)
        };
        found.map_err(|err| self.error(err))
    }

    /// The first tick at or after `time`.
    fn first_from(&self, time: DateTime<Utc>) -> Result<DateTime<Utc>, Error> {
        let floor = whole_second_floor(time);
        if floor == time {
            self.cron
                .find_next_occurrence(&floor, true)
                .map_err(|err| self.error(err))
        } else {
            self.next_after(floor)
        }
    }

    fn error(&self, err: croner::errors::CronError) -> Error {
        Error::Schedule {
            expression: self.expression.clone(),
            reason: err.to_string(),
        }
    }
}

fn whole_second_floor(time: DateTime<Utc>) -> DateTime<Utc> {
    // Truncating to a second cannot overflow for times the database returns.
    time.duration_trunc(TimeDelta::seconds(1)).unwrap_or(time)
}

impl FromStr for Schedule {
    type Err = Error;

    /// [`Schedule::cron`].
    fn from_str(expression: &str) -> Result<Self, Error> {
        Self::cron(expression)
    }
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("expression", &self.expression)
            .field("catch_up", &self.catch_up)
            .field("grace", &self.grace)
            .finish()
    }
}

/// The tick a periodic job was enqueued for: what a scheduled job type is
/// built from (`impl From<Tick> for MyJob`), so that the job knows which
/// period it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// The tick's time (whole seconds, UTC). A job enqueued by
    /// [`CatchUp::RunOnce`] after downtime has the latest missed tick.
    pub at: DateTime<Utc>,
    /// The tick of the job this schedule enqueued before this one; `None`
    /// for its first. Ticks in between were missed (the job of a
    /// [`CatchUp::RunOnce`] catch-up stands in for them).
    pub previous: Option<DateTime<Utc>>,
}

/// One scheduled job type, as the registry keeps it.
#[derive(Clone)]
pub(crate) struct Periodic {
    pub(crate) name: &'static str,
    max_attempts: u32,
    pub(crate) schedule: Schedule,
    /// Builds the job of a tick and encodes it (monomorphised for the type).
    payload: fn(Tick) -> Result<Vec<u8>, serde_json::Error>,
}

impl Periodic {
    pub(crate) fn new<J: Job + From<Tick>>(schedule: Schedule) -> Self {
        Self {
            name: J::NAME,
            max_attempts: J::MAX_ATTEMPTS,
            schedule,
            payload: |tick| serde_json::to_vec(&J::from(tick)),
        }
    }
}

/// Keeps every schedule until `shutdown`: enqueues each tick's job (see the
/// module's doc).
pub(crate) async fn run(pool: PgPool, schedules: Vec<Periodic>, shutdown: CancellationToken) {
    let keepers = schedules
        .into_iter()
        .map(|periodic| keep(pool.clone(), periodic, shutdown.clone()));
    futures::future::join_all(keepers).await;
}

/// The longest a scheduler sleeps between passes, however far the next tick:
/// a suspended machine's monotonic clock stops, so a long sleep could end
/// late; and tokio caps timers at about two years.
const LONGEST_SLEEP: Duration = Duration::from_secs(60);

/// How long a scheduler waits after a failed pass (the database is down,
/// say) before the next; ticks meanwhile are late, or missed past the grace.
const RETRY_AFTER: Duration = Duration::from_secs(1);

async fn keep(pool: PgPool, periodic: Periodic, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let wait = match pass(&pool, &periodic).await {
            Ok(until_next_tick) => {
                if failing {
                    tracing::info!(schedule = periodic.name, "schedule enqueues again");
                }
                failing = false;
                until_next_tick.min(LONGEST_SLEEP)
            }
            Err(err) => {
                // Once per outage: the worker's supervisor reports the database.
                if !failing {
                    tracing::warn!(schedule = periodic.name, error = %err, "enqueueing a schedule's ticks failed; will retry");
                }
                failing = true;
                RETRY_AFTER
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// What one pass over a schedule does.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The ticks to enqueue a job for, oldest first.
    enqueue: Vec<DateTime<Utc>>,
    /// The first and last tick missed (later than the grace), if any.
    missed: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The first tick after `now`.
    next: DateTime<Utc>,
}

/// The pass at database time `now` of a schedule handled up to
/// `handled_until`: ticks in `(handled_until, now]` are due; those within the
/// grace get a job each, older ones were missed and follow the catch-up.
fn plan(
    schedule: &Schedule,
    handled_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Plan, Error> {
    let next = schedule.next_after(now.max(handled_until))?;
    let first = schedule.next_after(handled_until)?;
    let mut plan = Plan {
        enqueue: Vec::new(),
        missed: None,
        next,
    };
    if first > now {
        return Ok(plan);
    }
    let grace = TimeDelta::from_std(schedule.grace).unwrap_or(TimeDelta::MAX);
    let on_time_from = now
        .checked_sub_signed(grace)
        .unwrap_or(DateTime::UNIX_EPOCH);
    let mut tick = first;
    if first < on_time_from {
        let last_missed = schedule.last_before(on_time_from)?;
        plan.missed = Some((first, last_missed));
        if schedule.catch_up == CatchUp::RunOnce {
            plan.enqueue.push(last_missed);
        }
        tick = schedule.first_from(on_time_from)?;
    }
    while tick <= now {
        plan.enqueue.push(tick);
        tick = schedule.next_after(tick)?;
    }
    Ok(plan)
}

/// One pass: enqueues the due ticks' jobs and advances the schedule, in one
/// transaction. Returns how long to wait for the next tick.
async fn pass(pool: &PgPool, periodic: &Periodic) -> Result<Duration, Error> {
    let schedule = &periodic.schedule;
    let mut tx = pool.begin().await?;
    let (handled_until, mut previous, now): (DateTime<Utc>, Option<DateTime<Utc>>, DateTime<Utc>) =
        sqlx::query_as(queries::LOCK_SCHEDULE)
            .bind(periodic.name)
            .bind(&schedule.expression)
            .bind(schedule.catch_up.as_str())
            .fetch_one(&mut *tx)
            .await?;
    let plan = plan(schedule, handled_until, now)?;
    if let Some((first, last)) = plan.missed {
        tracing::warn!(
            schedule = periodic.name,
            missed.first = %first,
            missed.last = %last,
            catch_up = schedule.catch_up.as_str(),
            "ticks were missed: no worker enqueued them in time"
        );
    }
    let mut last_job = None;
    for &at in &plan.enqueue {
        let tick = Tick { at, previous };
        if let Some(id) = enqueue_tick(&mut tx, periodic, tick).await? {
            last_job = Some(id);
        }
        previous = Some(at);
    }
    sqlx::query(queries::ADVANCE_SCHEDULE)
        .bind(periodic.name)
        .bind(now)
        .bind(plan.enqueue.last())
        .bind(&last_job)
        .bind(plan.next)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((plan.next - now).to_std().unwrap_or_default())
}

/// Inserts the job of `tick`; `None` if the tick had its job already.
async fn enqueue_tick(
    tx: &mut sqlx::PgConnection,
    periodic: &Periodic,
    tick: Tick,
) -> Result<Option<String>, Error> {
    let span = producer_span(periodic.name);
    async {
        let (keys, values): (Vec<String>, Vec<String>) =
            observability::inject_current().into_iter().unzip();
        let key = format!(
            "{}@{}",
            periodic.name,
            tick.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let id: Option<String> = sqlx::query_scalar(queries::INSERT_TICK_JOB)
            .bind(Ulid::generate().to_string())
            .bind(periodic.name)
            .bind((periodic.payload)(tick)?)
            .bind(i32::try_from(periodic.max_attempts).unwrap_or(i32::MAX))
            .bind(&key)
            .bind(&keys)
            .bind(&values)
            .fetch_optional(&mut *tx)
            .instrument(observability::db_span("INSERT", "apalis.jobs"))
            .await?;
        if let Some(id) = &id {
            tracing::Span::current().record("messaging.message.id", id.as_str());
            metrics::counter!("durable_jobs_enqueued_total", "queue" => periodic.name).increment(1);
        }
        Ok(id)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("a test time")
    }

    #[test]
    fn errors_name_the_expression_and_what_is_wrong() {
        for (expression, says) in [
            ("0 3 * * *", "it has 5 fields, not 6"),
            ("0 0 3 * * * 2027", "it has 7 fields, not 6"),
            ("61 * * * * *", "61"),
            ("0 0 0 30 2 *", "never matches"),
            ("every minute", "it has 2 fields"),
            ("every minute of the whole day", "illegal character"),
            ("", "it has 0 fields"),
        ] {
            let err = Schedule::cron(expression)
                .expect_err(expression)
                .to_string();
            let (reason, help) = err.split_once(" (expected").expect("a help suffix");
            assert!(
                reason.starts_with(&format!("invalid schedule {expression:?}: "))
                    && reason.contains(says)
                    && help.contains("seconds first"),
                "{expression:?}: {err}"
            );
        }
    }

    #[test]
    fn a_pass_on_time_enqueues_the_tick_that_fell_due() -> Result<(), Error> {
        let every_minute = Schedule::cron("0 * * * * *")?;
        let plan = plan(
            &every_minute,
            at("2026-12-01T10:00:00.004Z"),
            at("2026-12-01T10:01:00.002Z"),
        )?;
        assert_eq!(
            plan,
            Plan {
                enqueue: vec![at("2026-12-01T10:01:00Z")],
                missed: None,
                next: at("2026-12-01T10:02:00Z"),
            }
        );
        let early = super::plan(
            &every_minute,
            at("2026-12-01T10:01:00.002Z"),
            at("2026-12-01T10:01:59.999Z"),
        )?;
        assert!(early.enqueue.is_empty(), "{:?}", early.enqueue);
        assert_eq!(early.next, at("2026-12-01T10:02:00Z"));
        Ok(())
    }

    #[test]
    fn late_ticks_within_the_grace_each_get_a_job() -> Result<(), Error> {
        let every_second = Schedule::cron("* * * * * *")?.grace(Duration::from_secs(3));
        let plan = plan(
            &every_second,
            at("2026-12-01T10:00:00.5Z"),
            at("2026-12-01T10:00:03.5Z"),
        )?;
        assert_eq!(
            plan.enqueue,
            [
                at("2026-12-01T10:00:01Z"),
                at("2026-12-01T10:00:02Z"),
                at("2026-12-01T10:00:03Z")
            ]
        );
        assert_eq!(plan.missed, None);
        Ok(())
    }

    #[test]
    fn missed_ticks_are_skipped_or_run_once() -> Result<(), Error> {
        // Down from 10:50 to 12:20: 11:00 and 12:00 were missed.
        let hourly = Schedule::cron("0 0 * * * *")?;
        let (down, up) = (at("2026-12-01T10:50:00Z"), at("2026-12-01T12:20:00Z"));
        let skipped = plan(&hourly, down, up)?;
        assert!(skipped.enqueue.is_empty(), "{:?}", skipped.enqueue);
        assert_eq!(
            skipped.missed,
            Some((at("2026-12-01T11:00:00Z"), at("2026-12-01T12:00:00Z")))
        );
        assert_eq!(skipped.next, at("2026-12-01T13:00:00Z"));
        let caught_up = plan(&hourly.clone().catch_up(CatchUp::RunOnce), down, up)?;
        assert_eq!(caught_up.enqueue, [at("2026-12-01T12:00:00Z")]);
        assert_eq!(caught_up.missed, skipped.missed);
        // Back 30 s after 12:00: the 12:00 tick is late, not missed.
        let late = plan(&hourly, down, at("2026-12-01T12:00:30Z"))?;
        assert_eq!(late.enqueue, [at("2026-12-01T12:00:00Z")]);
        assert_eq!(
            late.missed,
            Some((at("2026-12-01T11:00:00Z"), at("2026-12-01T11:00:00Z")))
        );
        Ok(())
    }

    #[test]
    fn run_once_enqueues_one_catch_up_job_then_the_ticks_within_the_grace() -> Result<(), Error> {
        let every_second = Schedule::cron("* * * * * *")?
            .grace(Duration::from_millis(1500))
            .catch_up(CatchUp::RunOnce);
        let plan = plan(
            &every_second,
            at("2026-12-01T10:00:00.2Z"),
            at("2026-12-01T10:00:10.7Z"),
        )?;
        // 10:00:01 to 10:00:09.2 missed; 10:00:10 within the grace.
        assert_eq!(
            plan.missed,
            Some((at("2026-12-01T10:00:01Z"), at("2026-12-01T10:00:09Z")))
        );
        assert_eq!(
            plan.enqueue,
            [at("2026-12-01T10:00:09Z"), at("2026-12-01T10:00:10Z")]
        );
        Ok(())
    }

    #[test]
    fn a_clock_that_went_back_enqueues_nothing() -> Result<(), Error> {
        let every_second = Schedule::cron("* * * * * *")?;
        let plan = plan(
            &every_second,
            at("2026-12-01T10:00:10Z"),
            at("2026-12-01T10:00:05Z"),
        )?;
        assert!(plan.enqueue.is_empty(), "{:?}", plan.enqueue);
        assert_eq!(plan.next, at("2026-12-01T10:00:11Z"));
        Ok(())
    }
}
