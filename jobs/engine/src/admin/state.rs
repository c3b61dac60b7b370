//! A job's state, as operators see it: [`JobState`], defined once by the
//! view `apalis.job_states` (see the engine's migrations).

use std::{fmt, str::FromStr};

use sqlx::{Postgres, postgres::PgTypeInfo};

/// Where a job is in its life. The view `apalis.job_states` computes it from
/// apalis's status and the job's due time; its text is the lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Due, waiting for a worker.
    Pending,
    /// Waiting for its time: a retry's backoff, a delay, a unique window.
    Scheduled,
    /// Suspended in a durable sleep (`JobContext::sleep`), due when it ends.
    Sleeping,
    /// Suspended until a signal or a child arrives (`JobContext::wait_for`,
    /// `JobContext::await_result`), or its timeout.
    Waiting,
    /// Taken by a worker, not started yet.
    Claimed,
    /// An attempt is running.
    Running,
    /// Finished with a result.
    Done,
    /// Out of attempts, killed or cancelled; kept for operators until pruned.
    Dead,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        Self::Pending,
        Self::Scheduled,
        Self::Sleeping,
        Self::Waiting,
        Self::Claimed,
        Self::Running,
        Self::Done,
        Self::Dead,
    ];

    /// Its name: `pending`, `scheduled`, `sleeping`, `waiting`, `claimed`,
    /// `running`, `done`, `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Sleeping => "sleeping",
            Self::Waiting => "waiting",
            Self::Claimed => "claimed",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }

    /// Whether the job will not run again (done or dead).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Dead)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`JobState::ALL`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a job state (pending, scheduled, sleeping, waiting, claimed, running, done, dead)"
)]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| UnknownState(name.to_owned()))
    }
}

impl PartialEq<str> for JobState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl sqlx::Type<Postgres> for JobState {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for JobState {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let name = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(name.parse()?)
    }
}

impl sqlx::Encode<'_, Postgres> for JobState {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_name() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("queued".parse::<JobState>().is_err());
    }
}
