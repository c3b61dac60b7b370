//! How fast a queue may go: [`Limits`] declared on a job type
//! (`Job::limits`) or set by an operator (`admin::set_limits`),
//! enforced in the claim across every worker process.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{error::Error, queries};

/// A queue's limits; any of them may be unset. They hold across every
/// process: claims of a limited queue take turns under its control row's
/// lock, counting what is claimed or running in the database, not in any
/// process's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// At most this many of the queue's jobs claimed or running at once.
    pub concurrency: Option<u32>,
    /// Starts at most at this rate (a token bucket).
    pub rate: Option<Rate>,
    /// At most this many claimed or running per `Job::concurrency_key`;
    /// claims then go round-robin across the keys with due work.
    pub key_concurrency: Option<u32>,
}

impl Limits {
    /// No limit (the default of every job type).
    pub const fn none() -> Self {
        Self {
            concurrency: None,
            rate: None,
            key_concurrency: None,
        }
    }

    /// At most `n` (at least 1) of the queue's jobs claimed or running at once.
    #[must_use]
    pub const fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(if n == 0 { 1 } else { n });
        self
    }

    /// Starts at most at `rate` (App Engine's `rate` and `bucket_size`).
    #[must_use]
    pub const fn rate(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// At most `n` (at least 1) claimed or running per concurrency key.
    #[must_use]
    pub const fn key_concurrency(mut self, n: u32) -> Self {
        self.key_concurrency = Some(if n == 0 { 1 } else { n });
        self
    }

    /// Whether no limit is set.
    pub const fn is_none(&self) -> bool {
        self.concurrency.is_none() && self.rate.is_none() && self.key_concurrency.is_none()
    }
}

/// A token bucket: `per_second` tokens a second, up to `burst` saved (by
/// default one second's worth, at least 1); each job started takes one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Tokens added per second (positive; a smaller or non-finite value
    /// becomes one job an hour).
    pub per_second: f64,
    /// The most tokens saved up: the largest burst of starts.
    pub burst: Option<u32>,
}

impl Rate {
    /// The slowest rate a [`Rate`] takes: one job an hour.
    const SLOWEST: f64 = 1.0 / 3600.0;

    /// `per_second` starts a second.
    pub fn per_second(per_second: f64) -> Self {
        let per_second = if per_second.is_finite() && per_second >= Self::SLOWEST {
            per_second
        } else {
            Self::SLOWEST
        };
        Self {
            per_second,
            burst: None,
        }
    }

    /// `per_minute` starts a minute.
    pub fn per_minute(per_minute: f64) -> Self {
        Self::per_second(per_minute / 60.0)
    }

    /// At most `burst` (at least 1) starts at once after a quiet spell.
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst.max(1));
        self
    }
}

/// The SQL columns of `limits`: concurrency, rate per second, burst, key
/// concurrency.
/// "concurrency 4, rate 10/s burst 5, key concurrency 1", or "no limits".
impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.concurrency {
            parts.push(format!("concurrency {n}"));
        }
        if let Some(rate) = self.rate {
            let burst = rate
                .burst
                .map(|b| format!(" burst {b}"))
                .unwrap_or_default();
            parts.push(format!("rate {}/s{burst}", rate.per_second));
        }
        if let Some(n) = self.key_concurrency {
            parts.push(format!("key concurrency {n}"));
        }
        if parts.is_empty() {
            f.write_str("no limits")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

pub(crate) fn columns(limits: &Limits) -> (Option<i32>, Option<f64>, Option<i32>, Option<i32>) {
    let count = |n: Option<u32>| n.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    (
        count(limits.concurrency),
        limits.rate.map(|rate| rate.per_second),
        count(limits.rate.and_then(|rate| rate.burst)),
        count(limits.key_concurrency),
    )
}

/// Records `queue`'s declared limits (see `queries::DECLARE_LIMITS`).
pub(crate) async fn declare(pool: &PgPool, queue: &str, limits: &Limits) -> Result<(), Error> {
    let (concurrency, rate, burst, key_concurrency) = columns(limits);
    sqlx::query(queries::DECLARE_LIMITS)
        .bind(queue)
        .bind(concurrency)
        .bind(rate)
        .bind(burst)
        .bind(key_concurrency)
        .execute(pool)
        .await?;
    Ok(())
}

/// Limits from their SQL columns (as [`columns`] gives them).
pub(crate) fn from_columns(
    concurrency: Option<i32>,
    rate: Option<f64>,
    burst: Option<i32>,
    key_concurrency: Option<i32>,
) -> Limits {
    let count = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok());
    Limits {
        concurrency: count(concurrency),
        rate: rate.map(|per_second| Rate {
            per_second,
            burst: count(burst),
        }),
        key_concurrency: count(key_concurrency),
    }
}
