//! The one list of job types an app runs: [`Registry`].

use std::time::Duration;

use apalis::prelude::Monitor;

use crate::{
    job::{Backoff, Job},
    limits::Limits,
    maintenance::prune::PruneJobs,
    runtime::stack::{self, WorkerParts},
    schedule::{Periodic, Schedule, Tick},
};

/// Every job type an app runs; `C` is the context their runs share (given to
/// [`crate::Worker`]). Built once: the worker, the reaper of unknown types, the
/// watchdog, pool sizing and the operator views all read it, so adding a job
/// type is its declaration plus one `register` line.
///
/// ```
/// # use durable_jobs::{Job, JobContext, JobError, Registry};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct SendWelcome;
/// # impl Job for SendWelcome {
/// #     const NAME: &'static str = "send_welcome";
/// #     type Context = ();
/// #     type Output = ();
/// #     async fn run(self, _: JobContext<'_, ()>) -> Result<(), JobError> { Ok(()) }
/// # }
/// let registry = Registry::<()>::new().register::<SendWelcome>();
/// // The engine's own periodic prune runs beside every app's job types.
/// assert_eq!(registry.queues(), ["prune_jobs", "send_welcome"]);
/// ```
pub struct Registry<C> {
    pub(crate) jobs: Vec<Registration<C>>,
    /// The periodic ones among them, with their schedules (the engine's
    /// prune is added by the runtime, on `WorkerConfig::prune_schedule`).
    pub(crate) schedules: Vec<Periodic>,
}

/// What the runtime knows of one registered job type.
pub(crate) struct Registration<C> {
    pub(crate) name: &'static str,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Duration,
    pub(crate) backoff: Backoff,
    /// Its declared limits ([`Job::limits`]).
    pub(crate) limits: Limits,
    /// Adds this type's worker to a monitor (monomorphised for the type).
    pub(crate) add_worker: fn(Monitor, &WorkerParts<C>) -> Monitor,
}

// Derived Clone would ask for `C: Clone` through the fn pointer's parameter;
// every field is Copy.
impl<C> Clone for Registration<C> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            backoff: self.backoff,
            limits: self.limits,
            add_worker: self.add_worker,
        }
    }
}

impl<C> Clone for Registry<C> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
            schedules: self.schedules.clone(),
        }
    }
}

impl<C> std::fmt::Debug for Registry<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("queues", &self.queues())
            .finish_non_exhaustive()
    }
}

impl<C: Clone + Send + Sync + 'static> Default for Registry<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clone + Send + Sync + 'static> Registry<C> {
    /// A registry of job types whose context is `C`, holding only the
    /// engine's own: `prune_jobs`, the periodic retention prune (so that name
    /// is taken).
    pub fn new() -> Self {
        Self {
            jobs: vec![Registration {
                name: PruneJobs::NAME,
                max_attempts: PruneJobs::MAX_ATTEMPTS,
                timeout: PruneJobs::TIMEOUT,
                backoff: PruneJobs::BACKOFF,
                limits: Limits::none(),
                add_worker: stack::add_prune_worker::<C>,
            }],
            schedules: Vec::new(),
        }
    }

    /// Adds job type `J`.
    ///
    /// # Panics
    /// If a type with the same [`Job::NAME`] is registered already: two types
    /// on one queue would take each other's jobs.
    pub fn register<J: Job<Context = C>>(mut self) -> Self {
        assert!(
            !self.queues().contains(&J::NAME),
            "job type {:?} is registered twice",
            J::NAME
        );
        self.jobs.push(Registration {
            name: J::NAME,
            max_attempts: J::MAX_ATTEMPTS,
            timeout: J::TIMEOUT,
            backoff: J::BACKOFF,
            limits: J::limits(),
            add_worker: stack::add_worker::<J>,
        });
        self
    }

    /// Adds job type `J` as a periodic job: each tick of `schedule` enqueues
    /// one `J::from(tick)`, once however many workers run (instead of
    /// [`Registry::register`], not as well).
    ///
    /// ```
    /// # use durable_jobs::{Job, JobContext, JobError, Registry, Schedule, Tick};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct SendDigest { tick: Tick }
    ///
    /// impl From<Tick> for SendDigest {
    ///     fn from(tick: Tick) -> Self { Self { tick } }
    /// }
    /// # impl Job for SendDigest {
    /// #     const NAME: &'static str = "send_digest";
    /// #     type Context = ();
    /// #     type Output = ();
    /// #     async fn run(self, _: JobContext<'_, ()>) -> Result<(), JobError> { Ok(()) }
    /// # }
    /// let registry = Registry::<()>::new().schedule::<SendDigest>(Schedule::cron("0 0 8 * * MON")?);
    /// assert_eq!(registry.queues(), ["prune_jobs", "send_digest"]);
    /// # Ok::<(), durable_jobs::Error>(())
    /// ```
    ///
    /// # Panics
    /// As [`Registry::register`], if a type with the same name is registered.
    pub fn schedule<J: Job<Context = C> + From<Tick>>(self, schedule: Schedule) -> Self {
        let mut registry = self.register::<J>();
        registry.schedules.push(Periodic::new::<J>(schedule));
        registry
    }
}

impl<C> Registry<C> {
    /// How many queues (job types) there are.
    pub(crate) fn queue_count(&self) -> u32 {
        u32::try_from(self.jobs.len()).unwrap_or(u32::MAX)
    }

    /// The queues (job type names), in registration order.
    pub fn queues(&self) -> Vec<&'static str> {
        self.jobs.iter().map(|job| job.name).collect()
    }
}
