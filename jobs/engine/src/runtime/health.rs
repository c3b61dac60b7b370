//! What a worker process is doing, for readiness checks ([`Health`]), and
//! when it last started a job ([`Activity`], which the watchdog reads).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// When this process last started a job attempt (Unix milliseconds).
pub type Activity = Arc<AtomicU64>;

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Records that a job attempt starts now.
pub fn mark_activity(activity: &Activity) {
    activity.store(now_millis(), Ordering::Relaxed);
}

/// What a worker's supervisor is doing, for readiness checks (`web`'s
/// `/readyz` with the embedded worker). Cheap to clone; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<std::sync::atomic::AtomicU8>);

/// The states [`Health`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Not started yet, or stopped.
    Stopped,
    /// Running jobs.
    Running,
    /// Waiting for the database to answer before restarting.
    WaitingForDatabase,
    /// Died on its own; restarting after a pause.
    Restarting,
}

impl Health {
    /// The current state.
    pub fn state(&self) -> WorkerState {
        match self.0.load(Ordering::Relaxed) {
            1 => WorkerState::Running,
            2 => WorkerState::WaitingForDatabase,
            3 => WorkerState::Restarting,
            _ => WorkerState::Stopped,
        }
    }

    /// Records `state`.
    pub fn set(&self, state: WorkerState) {
        let code = match state {
            WorkerState::Stopped => 0,
            WorkerState::Running => 1,
            WorkerState::WaitingForDatabase => 2,
            WorkerState::Restarting => 3,
        };
        self.0.store(code, Ordering::Relaxed);
    }
}
